{{- define "modelkeep.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "modelkeep.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "modelkeep.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "modelkeep.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "modelkeep.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelkeep.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "modelkeep.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{ include "modelkeep.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "modelkeep.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* The TLS Secret mounted at /etc/modelkeep/tls, or "" when the data directory's own is used. */}}
{{- define "modelkeep.tlsSecret" -}}
{{- if .Values.tls.certManager.enabled -}}
{{ include "modelkeep.fullname" . }}-tls
{{- else -}}
{{ .Values.tls.existingSecret }}
{{- end -}}
{{- end -}}

{{/* Settings shared by the server and the migration Job: plain values and secret references. */}}
{{- define "modelkeep.env" -}}
- name: MODELKEEP_DATA_DIR
  value: /var/lib/modelkeep/data
{{- with .Values.database.existingSecret }}
- name: MODELKEEP_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.database.secretKey }}
{{- end }}
{{- with .Values.redis.existingSecret }}
- name: MODELKEEP_LIMITS_STORAGE
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.redis.secretKey }}
{{- end }}
{{- with .Values.objectStore.url }}
- name: MODELKEEP_BLOB_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.keyService.url }}
- name: MODELKEEP_KEY_SERVICE
  value: {{ . | quote }}
{{- end }}
{{- if .Values.keyService.existingSecret }}
- name: MODELKEEP_KEY_SERVICE_TOKEN_FILE
  value: /etc/modelkeep/key-service/{{ .Values.keyService.secretKey }}
{{- end }}
{{- range $name, $value := .Values.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{- define "modelkeep.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{ default (include "modelkeep.fullname" .) .Values.serviceAccount.name }}
{{- else -}}
{{ default "default" .Values.serviceAccount.name }}
{{- end -}}
{{- end -}}
