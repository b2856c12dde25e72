{{/* The chart name, or nameOverride. */}}
{{- define "outbox-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource names: "<release>-<chart>", or the release name when it contains the chart name. */}}
{{- define "outbox-relay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "outbox-relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "outbox-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outbox-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "outbox-relay.labels" -}}
helm.sh/chart: {{ include "outbox-relay.chart" . }}
{{ include "outbox-relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "outbox-relay.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
One TOML value. Strings are JSON-quoted (a JSON string is a valid TOML basic string). Numbers
from values files arrive as float64, so whole numbers are printed as integers: the relay's
integer keys (batch_size, topic_partitions) reject 1000.0.
*/}}
{{- define "outbox-relay.tomlValue" -}}
{{- $kind := kindOf . -}}
{{- if eq $kind "string" -}}
{{- toJson . -}}
{{- else if eq $kind "bool" -}}
{{- . -}}
{{- else if or (eq $kind "float64") (eq $kind "float32") -}}
{{- if eq (float64 (int64 .)) (float64 .) }}{{ int64 . }}{{ else }}{{ . }}{{ end -}}
{{- else if hasPrefix "int" $kind -}}
{{- . -}}
{{- else -}}
{{- fail (printf "config: %v is not a string, number or boolean" .) -}}
{{- end -}}
{{- end }}

{{/*
relay.toml from .Values.config: a [section] per top-level key, its scalar keys, then a
[section.table] per nested map ([source.columns], [kafka.properties]). Keys are quoted, so
librdkafka names with dots work. Null values (dropped defaults) are skipped.
*/}}
{{- define "outbox-relay.relayToml" -}}
# Rendered by the outbox-relay Helm chart from .Values.config; see SPEC §5 for every key.
{{- range $section, $body := .Values.config }}
{{- if $body }}

[{{ $section }}]
{{- range $key, $value := $body }}
{{- if and (not (kindIs "map" $value)) (not (kindIs "invalid" $value)) }}
{{ toJson $key }} = {{ include "outbox-relay.tomlValue" $value }}
{{- end }}
{{- end }}
{{- range $key, $value := $body }}
{{- if kindIs "map" $value }}

[{{ $section }}.{{ $key }}]
{{- range $k, $v := $value }}
{{- if not (kindIs "invalid" $v) }}
{{ toJson $k }} = {{ include "outbox-relay.tomlValue" $v }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

[http]
"listen" = {{ printf "0.0.0.0:%d" (int .Values.port) | toJson }}
{{ end }}
