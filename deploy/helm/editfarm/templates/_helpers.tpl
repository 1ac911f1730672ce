{{/*
Chart name (63 chars max, DNS-1123).
*/}}
{{- define "editfarm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name when it already contains the chart name.
Truncated to 52 so that suffixes like "-render-worker" stay within 63 characters.
*/}}
{{- define "editfarm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart label value.
*/}}
{{- define "editfarm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels of every resource.
*/}}
{{- define "editfarm.labels" -}}
helm.sh/chart: {{ include "editfarm.chart" . }}
{{ include "editfarm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: editfarm
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels (release-wide).
*/}}
{{- define "editfarm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "editfarm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of one component: (dict "ctx" $ "component" "api").
*/}}
{{- define "editfarm.componentLabels" -}}
{{ include "editfarm.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Selector labels of one component: (dict "ctx" $ "component" "api").
*/}}
{{- define "editfarm.componentSelectorLabels" -}}
{{ include "editfarm.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "editfarm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "editfarm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: (dict "ctx" $ "image" .Values.images.api). A digest wins over the tag.
*/}}
{{- define "editfarm.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag | toString) }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- names of Secrets */}}

{{- define "editfarm.secretName" -}}
{{- default (include "editfarm.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "editfarm.s3SecretName" -}}
{{- default (printf "%s-s3" (include "editfarm.fullname" .)) .Values.s3.credentials.existingSecret }}
{{- end }}

{{/* S3 credentials are set when an existing Secret or both keys are given. */}}
{{- define "editfarm.s3HasCredentials" -}}
{{- if or .Values.s3.credentials.existingSecret (and .Values.s3.credentials.accessKeyId .Values.s3.credentials.secretAccessKey) }}true{{- end }}
{{- end }}

{{- define "editfarm.flowerSecretName" -}}
{{- default (printf "%s-flower" (include "editfarm.fullname" .)) .Values.flower.auth.existingSecret }}
{{- end }}

{{- define "editfarm.flowerSecretKey" -}}
{{- if .Values.flower.auth.existingSecret }}{{ .Values.flower.auth.existingSecretKey }}{{ else }}basic-auth{{ end }}
{{- end }}

{{/* ---------------------------------------------------------------- Redis */}}

{{- define "editfarm.redis.fullname" -}}
{{- printf "%s-redis" (include "editfarm.fullname" .) }}
{{- end }}

{{/* "true" when the editfarm processes authenticate to Redis. */}}
{{- define "editfarm.redis.hasPassword" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.enabled }}true{{ end }}
{{- else if or .Values.externalRedis.password .Values.externalRedis.existingSecret }}true
{{- end }}
{{- end }}

{{/* The Secret with the Redis password (chart-managed or existing). */}}
{{- define "editfarm.redis.secretName" -}}
{{- if and .Values.redis.enabled .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecret }}
{{- else if and (not .Values.redis.enabled) .Values.externalRedis.existingSecret }}
{{- .Values.externalRedis.existingSecret }}
{{- else }}
{{- include "editfarm.redis.fullname" . }}
{{- end }}
{{- end }}

{{- define "editfarm.redis.secretKey" -}}
{{- if and .Values.redis.enabled .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecretPasswordKey }}
{{- else if and (not .Values.redis.enabled) .Values.externalRedis.existingSecret }}
{{- .Values.externalRedis.existingSecretPasswordKey }}
{{- else }}redis-password
{{- end }}
{{- end }}

{{/* The chart creates the Redis password Secret unless an existing one is named. */}}
{{- define "editfarm.redis.createSecret" -}}
{{- if .Values.redis.enabled }}
{{- if and .Values.redis.auth.enabled (not .Values.redis.auth.existingSecret) }}true{{ end }}
{{- else if and .Values.externalRedis.password (not .Values.externalRedis.existingSecret) }}true
{{- end }}
{{- end }}

{{- define "editfarm.redis.host" -}}
{{- if .Values.redis.enabled }}
{{- include "editfarm.redis.fullname" . }}
{{- else if include "editfarm.redis.sentinel" . }}
{{- fail "externalRedis.sentinel: the primary has no fixed address for KEDA's redis trigger; set keda.enabled=false" }}
{{- else }}
{{- required "externalRedis.host (or externalRedis.sentinel.hosts) is required when redis.enabled is false" .Values.externalRedis.host }}
{{- end }}
{{- end }}

{{/* "true" when EDITFARM_REDIS_URL names the sentinels of an external Sentinel-backed Redis. */}}
{{- define "editfarm.redis.sentinel" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.sentinel.hosts }}true{{ end }}
{{- end }}

{{- define "editfarm.redis.port" -}}
{{- if .Values.redis.enabled }}6379{{ else }}{{ .Values.externalRedis.port }}{{ end }}
{{- end }}

{{- define "editfarm.redis.database" -}}
{{- if .Values.redis.enabled }}0{{ else }}{{ .Values.externalRedis.database }}{{ end }}
{{- end }}

{{- define "editfarm.redis.tls" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.tls }}true{{ else }}false{{ end }}
{{- end }}

{{/*
EDITFARM_REDIS_URL. The password is not written here: Kubernetes expands $(REDIS_PASSWORD)
from the env entry defined just before it (see editfarm.env.redis).
*/}}
{{- define "editfarm.redis.url" -}}
{{- if include "editfarm.redis.sentinel" . }}
{{- include "editfarm.redis.sentinelUrl" . }}
{{- else }}
{{- $scheme := ternary "rediss" "redis" (eq (include "editfarm.redis.tls" .) "true") }}
{{- $user := ternary .Values.externalRedis.username "" (not .Values.redis.enabled) }}
{{- $auth := "" }}
{{- if include "editfarm.redis.hasPassword" . }}
{{- $auth = printf "%s:$(REDIS_PASSWORD)@" $user }}
{{- else if $user }}
{{- $auth = printf "%s@" $user }}
{{- end }}
{{- $query := ternary "?ssl_cert_reqs=required" "" (eq $scheme "rediss") }}
{{- printf "%s://%s%s:%s/%s%s" $scheme $auth (include "editfarm.redis.host" .) (include "editfarm.redis.port" .) (include "editfarm.redis.database" .) $query }}
{{- end }}
{{- end }}

{{/*
EDITFARM_REDIS_URL for a Sentinel-backed Redis (broker/redis_conn.py):
redis+sentinel://[user:$(REDIS_PASSWORD)@]host:26379,.../<master>/<db>[?sentinel_password=$(REDIS_SENTINEL_PASSWORD)&ssl=true]
*/}}
{{- define "editfarm.redis.sentinelUrl" -}}
{{- $sentinel := .Values.externalRedis.sentinel }}
{{- $auth := "" }}
{{- if include "editfarm.redis.hasPassword" . }}
{{- $auth = printf "%s:$(REDIS_PASSWORD)@" .Values.externalRedis.username }}
{{- else if .Values.externalRedis.username }}
{{- $auth = printf "%s@" .Values.externalRedis.username }}
{{- end }}
{{- $query := list }}
{{- if $sentinel.passwordSecret.name }}
{{- $query = append $query "sentinel_password=$(REDIS_SENTINEL_PASSWORD)" }}
{{- end }}
{{- if $sentinel.tls }}
{{- $query = append $query "ssl=true" }}
{{- end }}
{{- printf "redis+sentinel://%s%s/%s/%v" $auth (join "," $sentinel.hosts) (required "externalRedis.sentinel.masterName is required with externalRedis.sentinel.hosts" $sentinel.masterName) .Values.externalRedis.database }}
{{- with $query }}?{{ join "&" . }}{{ end }}
{{- end }}

{{/* env entries: the Redis password (when any), the sentinels' (when any), then EDITFARM_REDIS_URL. */}}
{{- define "editfarm.env.redis" -}}
{{- if include "editfarm.redis.hasPassword" . }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "editfarm.redis.secretName" . }}
      key: {{ include "editfarm.redis.secretKey" . }}
{{- end }}
{{- if and (include "editfarm.redis.sentinel" .) .Values.externalRedis.sentinel.passwordSecret.name }}
- name: REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalRedis.sentinel.passwordSecret.name }}
      key: {{ .Values.externalRedis.sentinel.passwordSecret.key }}
{{- end }}
- name: EDITFARM_REDIS_URL
  value: {{ include "editfarm.redis.url" . | quote }}
{{- end }}

{{/* env entries: the S3 credentials, when configured. */}}
{{- define "editfarm.env.s3" -}}
{{- if include "editfarm.s3HasCredentials" . }}
- name: EDITFARM_S3_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "editfarm.s3SecretName" . }}
      key: {{ .Values.s3.credentials.accessKeyIdKey }}
- name: EDITFARM_S3_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "editfarm.s3SecretName" . }}
      key: {{ .Values.s3.credentials.secretAccessKeyKey }}
{{- end }}
{{- end }}

{{/* env entries from config.extraEnv (a name: value map). */}}
{{- define "editfarm.env.extra" -}}
{{- range $name, $value := .Values.config.extraEnv }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/*
A value kept across upgrades: the given value, else the one already stored in the Secret
(lookup; empty under `helm template`), else the generated default.
(dict "ctx" $ "secret" name "key" key "value" given "default" generated)
*/}}
{{- define "editfarm.stickyValue" -}}
{{- if .value }}
{{- .value }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .secret }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- index $existing.data .key | b64dec }}
{{- else }}
{{- .default }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pod-level fields shared by every editfarm pod. */}}
{{- define "editfarm.podCommon" -}}
serviceAccountName: {{ include "editfarm.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* Checksums that roll the pods when the ConfigMap or the chart-managed Secrets change. */}}
{{- define "editfarm.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if include "editfarm.hasCatalog" . }}
checksum/models: {{ include (print .Template.BasePath "/models-configmap.yaml") . | sha256sum }}
{{- end }}
{{- end }}
