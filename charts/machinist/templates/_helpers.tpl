{{/*
The chart name, or nameOverride.
*/}}
{{- define "machinist.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: fullnameOverride, else the release name when it
already contains the chart name, else <release>-<chart>. Truncated to 63 characters (a
DNS label).
*/}}
{{- define "machinist.fullname" -}}
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

{{/*
A name derived from the full name with a suffix, still at most 63 characters.
*/}}
{{- define "machinist.suffixedName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "machinist.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{/*
The chart label value: <name>-<version>.
*/}}
{{- define "machinist.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The labels every object gets.
*/}}
{{- define "machinist.labels" -}}
helm.sh/chart: {{ include "machinist.chart" . }}
{{ include "machinist.selectorLabels" . }}
app.kubernetes.io/version: {{ include "machinist.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: controller
app.kubernetes.io/part-of: machinist
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The labels that select the controller's pods (immutable in a Deployment's selector).
*/}}
{{- define "machinist.selectorLabels" -}}
app.kubernetes.io/name: {{ include "machinist.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount's name.
*/}}
{{- define "machinist.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "machinist.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image tag: image.tag, else the chart's appVersion.
*/}}
{{- define "machinist.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/*
The image reference.
*/}}
{{- define "machinist.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "machinist.imageTag" .) }}
{{- end }}

{{/*
The leader-election Role's name.
*/}}
{{- define "machinist.leaderElectionName" -}}
{{- include "machinist.suffixedName" (list . "leader-election") }}
{{- end }}

{{/*
The metrics Service's name.
*/}}
{{- define "machinist.metricsServiceName" -}}
{{- include "machinist.suffixedName" (list . "metrics") }}
{{- end }}

{{/*
The Machine-controller rules, shared by the ClusterRole (all namespaces) and the Role
(namespace-scoped mode). No wildcards: exactly the calls the controller makes.
*/}}
{{- define "machinist.controllerRules" -}}
- apiGroups: ["machinist.dev"]
  resources: ["machines"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["machinist.dev"]
  resources: ["machines/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["machinist.dev"]
  resources: ["machines/finalizers"]
  verbs: ["update"]
# The Secrets Machines use (spec.credentialsSecretRef, SSH keys): read, watched so a
# created or rotated Secret takes effect at once, and patched to add and remove the
# finalizer machinist.dev/secret-protection while a Machine uses them. A Machine's
# generated SSH key Secret is created once (it is owned by the Machine, and goes with it
# through garbage collection, so no delete).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
