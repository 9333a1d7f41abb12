{{/* The workers of an organisation, in the order they are rendered. */}}
{{- define "easguard.workerNames" -}}
collector mdm matcher evaluator executor mailer
{{- end -}}

{{- define "easguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "easguard.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "easguard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "easguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: easguard
{{- end -}}

{{- define "easguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "easguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "easguard.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The NATS URL: nats.url, or the client service of the NATS dependency
(named as the NATS chart names it: the release name if it holds "nats",
else <release>-nats, or the dependency's fullnameOverride).
*/}}
{{- define "easguard.natsURL" -}}
{{- if .Values.nats.url -}}
{{- .Values.nats.url -}}
{{- else if .Values.nats.enabled -}}
{{- $svc := "" -}}
{{- if .Values.nats.fullnameOverride -}}
{{- $svc = .Values.nats.fullnameOverride -}}
{{- else if contains "nats" .Release.Name -}}
{{- $svc = .Release.Name -}}
{{- else -}}
{{- $svc = printf "%s-nats" .Release.Name -}}
{{- end -}}
{{- printf "nats://%s:4222" ($svc | trunc 63 | trimSuffix "-") -}}
{{- else -}}
{{- fail "nats.url is required when nats.enabled is false (the NATS cluster's client URLs, comma-separated)" -}}
{{- end -}}
{{- end -}}

{{/*
The kinds of secret the chart mounts, the variable that names the file,
and which processes read it ("all": every worker and the console).
*/}}
{{- define "easguard.secretKinds" -}}
exchangePassword: {env: EASGUARD_EXCHANGE_PASSWORD_FILE, for: [collector, executor]}
smtpPassword: {env: EASGUARD_MAILER_SMTP_PASSWORD_FILE, for: [mailer]}
alertWebhookAuthorization: {env: EASGUARD_MAILER_ALERT_WEBHOOK_AUTHORIZATION_FILE, for: [mailer]}
graphClientSecret: {env: EASGUARD_MDM_GRAPH_CLIENT_SECRET_FILE, for: [mdm]}
graphCertificate: {env: EASGUARD_MDM_GRAPH_CERTIFICATE, for: [mdm]}
mdmWebhookSecret: {env: EASGUARD_MDM_WEBHOOK_SECRET_FILE, for: [mdm]}
natsPassword: {env: EASGUARD_NATS_PASSWORD_FILE, for: [all]}
natsToken: {env: EASGUARD_NATS_TOKEN_FILE, for: [all]}
natsCreds: {env: EASGUARD_NATS_CREDS_FILE, for: [all]}
oidcClientSecret: {env: EASGUARD_CONSOLE_OIDC_CLIENT_SECRET_FILE, for: [console]}
localUsers: {env: EASGUARD_CONSOLE_LOCAL_USERS_FILE, for: [console]}
tokens: {env: EASGUARD_CONSOLE_TOKENS_FILE, for: [console]}
{{- end -}}

{{/* Variables that hold a secret: never given as a value. */}}
{{- define "easguard.secretVars" -}}
EASGUARD_CONSOLE_OIDC_CLIENT_SECRET EASGUARD_EXCHANGE_PASSWORD EASGUARD_MAILER_ALERT_WEBHOOK_AUTHORIZATION EASGUARD_MAILER_SMTP_PASSWORD EASGUARD_MDM_GRAPH_CLIENT_SECRET EASGUARD_MDM_WEBHOOK_SECRET EASGUARD_NATS_LISTEN_PASSWORD EASGUARD_NATS_PASSWORD EASGUARD_NATS_TOKEN
{{- end -}}

{{/* Variables the chart sets itself. */}}
{{- define "easguard.managedVars" -}}
EASGUARD_ORG EASGUARD_WORKERS EASGUARD_NATS_URL EASGUARD_NATS_REPLICAS EASGUARD_HTTP_ADDR EASGUARD_DATA_DIR EASGUARD_CONSOLE_ADDR EASGUARD_CONSOLE_ORGS EASGUARD_CONSOLE_BEHIND_PROXY EASGUARD_EVALUATOR_POLICY_FILE EASGUARD_MDM_WEBHOOK_ADDR EASGUARD_CONSOLE_PUBLIC_URL
{{- end -}}

{{/*
The pod template of one process. Arguments (a dict): root (the top
context), org (the org's values, absent for the console), worker (a worker
name or "console"), labels (extra pod labels), env (the merged user env),
secrets (the merged secret references), resources, ports (extra
container ports), extraEnv (env the caller sets: a list of name/value),
policy (the policy ConfigMap's name, or empty), extraVolumes and
extraVolumeMounts (lists).
*/}}
{{- define "easguard.podTemplate" -}}
{{- $root := .root -}}
{{- $kinds := include "easguard.secretKinds" $root | fromYaml -}}
{{- $secretVars := splitList " " (include "easguard.secretVars" $root) -}}
{{- $managed := splitList " " (include "easguard.managedVars" $root) -}}
{{- range $k, $_ := .env }}
{{- if has $k $secretVars }}
{{- fail (printf "%s holds a secret: give it as a Secret reference under `secrets` (see the chart's README), never as a value in env" $k) }}
{{- end }}
{{- if has $k $managed }}
{{- fail (printf "%s is set by the chart; remove it from env" $k) }}
{{- end }}
{{- end }}
{{- $mounted := list -}}
{{- range $kind := keys .secrets | sortAlpha }}
{{- $def := index $kinds $kind }}
{{- if not $def }}
{{- fail (printf "unknown secret %q; known: %s" $kind (keys $kinds | sortAlpha | join ", ")) }}
{{- end }}
{{- if or (has "all" $def.for) (has $.worker $def.for) }}
{{- $mounted = append $mounted $kind }}
{{- end }}
{{- end -}}
metadata:
  labels:
    {{- include "easguard.labels" $root | nindent 4 }}
    {{- toYaml .labels | nindent 4 }}
    {{- with $root.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $root.Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  automountServiceAccountToken: false
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .worker }}
      image: {{ include "easguard.image" $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      env:
        {{- range .extraEnv }}
        - name: {{ .name }}
          value: {{ .value | toString | quote }}
        {{- end }}
        - name: EASGUARD_NATS_URL
          value: {{ include "easguard.natsURL" $root | quote }}
        - name: EASGUARD_NATS_REPLICAS
          value: {{ $root.Values.nats.streamReplicas | toString | quote }}
        - name: EASGUARD_HTTP_ADDR
          value: {{ printf ":%v" $root.Values.healthPort | quote }}
        - name: EASGUARD_DATA_DIR
          value: /tmp/easguard
        {{- range $kind := $mounted }}
        {{- $ref := index $.secrets $kind }}
        - name: {{ (index $kinds $kind).env }}
          value: {{ printf "/run/secrets/easguard/%s/%s" $kind $ref.key | quote }}
        {{- end }}
        {{- range $k := keys .env | sortAlpha }}
        - name: {{ $k }}
          value: {{ index $.env $k | toString | quote }}
        {{- end }}
      ports:
        - name: metrics
          containerPort: {{ $root.Values.healthPort }}
          protocol: TCP
        {{- with .ports }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: metrics
        {{- toYaml $root.Values.probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: metrics
        {{- toYaml $root.Values.probes.readiness | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      resources:
        {{- toYaml (default $root.Values.resources .resources) | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- range $kind := $mounted }}
        - name: {{ printf "secret-%s" (lower $kind) }}
          mountPath: {{ printf "/run/secrets/easguard/%s" $kind }}
          readOnly: true
        {{- end }}
        {{- if .policy }}
        - name: policy
          mountPath: /etc/easguard/policy
          readOnly: true
        {{- end }}
        {{- with .extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
    {{- range $kind := $mounted }}
    {{- $ref := index $.secrets $kind }}
    {{- if or (not $ref.name) (not $ref.key) }}
    {{- fail (printf "secret %s needs a name and a key (of an existing Secret)" $kind) }}
    {{- end }}
    - name: {{ printf "secret-%s" (lower $kind) }}
      secret:
        secretName: {{ $ref.name }}
        defaultMode: 0440
        items:
          - key: {{ $ref.key }}
            path: {{ $ref.key }}
    {{- end }}
    {{- if .policy }}
    - name: policy
      configMap:
        name: {{ .policy }}
    {{- end }}
    {{- with .extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $root.Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* A PodDisruptionBudget for a Deployment of two replicas or more. */}}
{{- define "easguard.pdb" -}}
{{- if and .root.Values.podDisruptionBudget.enabled (ge (int .replicas) 2) }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  labels:
    {{- include "easguard.labels" .root | nindent 4 }}
    {{- toYaml .labels | nindent 4 }}
spec:
  maxUnavailable: 1
  selector:
    matchLabels:
      {{- include "easguard.selectorLabels" .root | nindent 6 }}
      {{- toYaml .labels | nindent 6 }}
{{- end }}
{{- end -}}
