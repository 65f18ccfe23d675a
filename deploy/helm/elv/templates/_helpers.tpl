{{/* The default StorageClass for the backend. */}}
{{- define "elv.defaultClass" -}}
{{- if .Values.defaultStorageClass -}}
{{- .Values.defaultStorageClass -}}
{{- else if eq .Values.backend "lvm" -}}
elv-lvm-thin
{{- else -}}
elv-loop
{{- end -}}
{{- end -}}

{{/* The device-class file of the lvm backend. */}}
{{- define "elv.lvmConfig" -}}
{{- .Values.lvm.config | default (.Files.Get "files/lvm.toml") -}}
{{- end -}}

{{/* The lvm ConfigMap's name: its content's digest, so a change rolls the DaemonSet. */}}
{{- define "elv.lvmConfigMap" -}}
elv-lvm-{{ include "elv.lvmConfig" . | sha256sum | trunc 10 }}
{{- end -}}
