{{/* vim: set filetype=mustache: */}}

{{- define "knnlm-vdb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "knnlm-vdb.fullname" -}}
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

{{- define "knnlm-vdb.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "knnlm-vdb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "knnlm-vdb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "knnlm-vdb.labels" -}}
helm.sh/chart: {{ include "knnlm-vdb.chart" . }}
{{ include "knnlm-vdb.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "knnlm-vdb.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/*
The Milvus URI: settings.uri when set, else the bundled Milvus service (the milvus chart's
fullname logic, port 19530), else externalMilvus.uri.
*/}}
{{- define "knnlm-vdb.milvusUri" -}}
{{- if .Values.settings.uri }}
{{- .Values.settings.uri }}
{{- else if .Values.milvus.enabled }}
{{- $name := default "milvus" .Values.milvus.nameOverride }}
{{- $full := "" }}
{{- if .Values.milvus.fullnameOverride }}
{{- $full = .Values.milvus.fullnameOverride }}
{{- else if contains $name .Release.Name }}
{{- $full = .Release.Name }}
{{- else }}
{{- $full = printf "%s-%s" .Release.Name $name }}
{{- end }}
{{- printf "http://%s:%v" ($full | trunc 63 | trimSuffix "-") (dig "service" "port" 19530 .Values.milvus) }}
{{- else }}
{{- required "externalMilvus.uri is required when milvus.enabled=false" .Values.externalMilvus.uri }}
{{- end }}
{{- end }}

{{/* One setting's value as the CLI parses it: whole numbers without ".0" or exponents. */}}
{{- define "knnlm-vdb.settingValue" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) }}
{{- int64 . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/* The settings as a map KNNLM_<NAME> -> string: the ConfigMap's data, and the migrate hook's env.
Empty settings (k, temperature, lambda, skip_below by default) are left out: an environment
variable counts as an explicit flag and would override what `tune` stored with the domain. */}}
{{- define "knnlm-vdb.settingsEnv" -}}
{{- $env := dict }}
{{- range $name, $value := .Values.settings }}
{{- if not (or (kindIs "invalid" $value) (and (kindIs "string" $value) (eq $value "") (has $name (list "k" "temperature" "lambda" "skip_below")))) }}
{{- $_ := set $env (printf "KNNLM_%s" (upper $name)) (include "knnlm-vdb.settingValue" $value) }}
{{- end }}
{{- end }}
{{- $_ := set $env "KNNLM_URI" (include "knnlm-vdb.milvusUri" .) }}
{{- toYaml $env }}
{{- end }}

{{- define "knnlm-vdb.configName" -}}
{{- printf "%s-settings" (include "knnlm-vdb.fullname" .) }}
{{- end }}

{{/* Env every knnlm-vdb container gets besides the settings: the Milvus token and writable caches. */}}
{{- define "knnlm-vdb.commonEnv" -}}
{{- if and (not .Values.milvus.enabled) .Values.externalMilvus.tokenSecret.name }}
- name: KNNLM_MILVUS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalMilvus.tokenSecret.name }}
      key: {{ .Values.externalMilvus.tokenSecret.key }}
{{- end }}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: HF_HOME
  value: /tmp/.cache/huggingface
{{- end }}

{{/* resources, plus nvidia.com/gpu limits when gpu > 0. Call with (list resources gpu). */}}
{{- define "knnlm-vdb.resources" -}}
{{- $res := deepCopy (index . 0 | default dict) }}
{{- $gpu := index . 1 | int }}
{{- if gt $gpu 0 }}
{{- $limits := get $res "limits" | default dict }}
{{- $_ := set $limits "nvidia.com/gpu" $gpu }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* Scheduling: the component's own value if non-empty, else the chart-wide one. Call with (list component root). */}}
{{- define "knnlm-vdb.scheduling" -}}
{{- $c := index . 0 }}
{{- $v := index . 1 }}
{{- with ($c.nodeSelector | default $v.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with ($c.tolerations | default $v.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with ($c.affinity | default $v.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod-level fields shared by every pod of the chart. */}}
{{- define "knnlm-vdb.podCommon" -}}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/*
An initContainer that waits until the Milvus endpoint accepts TCP connections, so migrate,
ingest and serve do not crash-loop while a bundled Milvus starts. Skipped for Milvus Lite (a
file URI). Uses the app image's Python: no extra image to pull.
*/}}
{{- define "knnlm-vdb.waitForMilvus" -}}
{{- if and .Values.waitForMilvus.enabled (regexMatch "^(https?|tcp|grpc)://" (include "knnlm-vdb.milvusUri" .)) }}
- name: wait-for-milvus
  image: {{ include "knnlm-vdb.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - python
    - -c
    - |
      import os, socket, sys, time, urllib.parse
      u = urllib.parse.urlsplit(os.environ["KNNLM_URI"])
      host, port = u.hostname, u.port or (443 if u.scheme == "https" else 19530)
      deadline = time.monotonic() + float(os.environ["WAIT_TIMEOUT"])
      while True:
          try:
              socket.create_connection((host, port), timeout=5).close()
              print(f"milvus at {host}:{port} is up"); sys.exit(0)
          except OSError as e:
              if time.monotonic() > deadline:
                  sys.exit(f"milvus at {host}:{port} unreachable: {e}")
              print(f"waiting for milvus at {host}:{port}: {e}", flush=True); time.sleep(5)
  env:
    - name: KNNLM_URI
      value: {{ include "knnlm-vdb.milvusUri" . | quote }}
    - name: WAIT_TIMEOUT
      value: {{ .Values.waitForMilvus.timeoutSeconds | quote }}
  resources:
    requests:
      cpu: 10m
      memory: 64Mi
    limits:
      memory: 256Mi
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
{{- end }}
{{- end }}

{{- define "knnlm-vdb.ingestRequired" -}}
{{- $i := .Values.ingest }}
{{- $_ := required "ingest.domain is required for the ingest Job/CronJob" $i.domain }}
{{- $_ := required "ingest.corpus.existingClaim (a PVC holding the corpus) is required for the ingest Job/CronJob" $i.corpus.existingClaim }}
{{- if not $i.corpus.files }}
{{- fail "ingest.corpus.files (paths under ingest.corpus.mountPath) must list at least one file" }}
{{- end }}
{{- end }}

{{/*
The ingest Job's spec, shared by the one-off Job and the CronJob's jobTemplate: an Indexed Job
of ingest.shards pods; pod i appends shard i/N of the corpus. Kubernetes sets
JOB_COMPLETION_INDEX in the pods of an Indexed Job and expands $(JOB_COMPLETION_INDEX) in args.
*/}}
{{- define "knnlm-vdb.ingestJobSpec" -}}
{{- include "knnlm-vdb.ingestRequired" . }}
{{- $i := .Values.ingest }}
{{- $n := $i.shards | int }}
completionMode: Indexed
completions: {{ $n }}
parallelism: {{ $i.parallelism | default $n | int }}
backoffLimit: {{ $i.backoffLimit }}
template:
  metadata:
    labels:
      {{- include "knnlm-vdb.selectorLabels" . | nindent 6 }}
      app.kubernetes.io/component: ingest
    annotations:
      checksum/settings: {{ include "knnlm-vdb.settingsEnv" . | sha256sum }}
  spec:
    restartPolicy: Never
    serviceAccountName: {{ include "knnlm-vdb.serviceAccountName" . }}
    {{- include "knnlm-vdb.podCommon" . | nindent 4 }}
    {{- with (include "knnlm-vdb.scheduling" (list $i .Values) | trim) }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with (include "knnlm-vdb.waitForMilvus" . | trim) }}
    initContainers:
      {{- . | nindent 6 }}
    {{- end }}
    containers:
      - name: append
        image: {{ include "knnlm-vdb.image" . }}
        imagePullPolicy: {{ .Values.image.pullPolicy }}
        args:
          - append
          - --domain
          - {{ $i.domain | quote }}
          {{- range $i.corpus.files }}
          - --corpus
          - {{ printf "%s/%s" (trimSuffix "/" $i.corpus.mountPath) (trimPrefix "/" .) | quote }}
          {{- end }}
          - --shard
          - {{ printf "$(JOB_COMPLETION_INDEX)/%d" $n | quote }}
          {{- range $i.extraArgs }}
          - {{ . | quote }}
          {{- end }}
        envFrom:
          - configMapRef:
              name: {{ include "knnlm-vdb.configName" . }}
        env:
          {{- include "knnlm-vdb.commonEnv" . | trim | nindent 10 }}
        resources:
          {{- include "knnlm-vdb.resources" (list $i.resources $i.gpu) | nindent 10 }}
        securityContext:
          {{- toYaml .Values.securityContext | nindent 10 }}
        volumeMounts:
          - name: tmp
            mountPath: /tmp
          - name: corpus
            mountPath: {{ $i.corpus.mountPath }}
            readOnly: true
          {{- with (include "knnlm-vdb.modelMount" . | trim) }}
          {{- . | nindent 10 }}
          {{- end }}
    volumes:
      - name: tmp
        emptyDir: {}
      - name: corpus
        persistentVolumeClaim:
          claimName: {{ $i.corpus.existingClaim }}
          readOnly: true
      {{- with (include "knnlm-vdb.modelVolume" . | trim) }}
      {{- . | nindent 6 }}
      {{- end }}
{{- end }}

{{- define "knnlm-vdb.modelMount" -}}
{{- if .Values.model.existingClaim }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
  {{- with .Values.model.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{- define "knnlm-vdb.modelVolume" -}}
{{- if .Values.model.existingClaim }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.existingClaim }}
    readOnly: true
{{- end }}
{{- end }}

{{/*
serve's security, decided once for the Deployment and NOTES.txt. "true" when serve runs with
--insecure: neither TLS (serve.tls.secretName) nor client tokens (serve.auth.tokenSecret), and
serve.insecure. Fails the render when serve would refuse to start (neither, and not
serve.insecure) or would be open beyond the cluster (an --insecure serve behind a NodePort or
LoadBalancer Service).
*/}}
{{- define "knnlm-vdb.serveInsecure" -}}
{{- $s := .Values.serve }}
{{- if not (or $s.tls.secretName $s.auth.tokenSecret) }}
{{- if not $s.insecure }}
{{- fail "serve needs TLS (serve.tls.secretName) and/or client tokens (serve.auth.tokenSecret); set serve.insecure=true to serve plaintext without authentication on a trusted network" }}
{{- end }}
{{- if ne $s.service.type "ClusterIP" }}
{{- fail (printf "serve.service.type=%s would expose an unauthenticated plaintext serve outside the cluster: set serve.tls.secretName and/or serve.auth.tokenSecret (serve.insecure is for ClusterIP only)" $s.service.type) }}
{{- end }}
{{- if and $s.tls.clientCASecret (not $s.tls.secretName) }}
{{- fail "serve.tls.clientCASecret (mutual TLS) needs serve.tls.secretName" }}
{{- end }}
true
{{- else if and $s.tls.clientCASecret (not $s.tls.secretName) }}
{{- fail "serve.tls.clientCASecret (mutual TLS) needs serve.tls.secretName" }}
{{- end }}
{{- end }}

{{/*
The port the kubelet probes: serve.healthPort when set, else serve.port + 1 with TLS (probes
cannot speak TLS), else serve.port (plaintext, and health needs no token). When it differs from
serve.port, serve gets --health-port and answers health there in plaintext.
*/}}
{{- define "knnlm-vdb.healthPort" -}}
{{- $s := .Values.serve }}
{{- $port := $s.port | int }}
{{- $hp := $port }}
{{- if $s.healthPort }}
{{- $hp = $s.healthPort | int }}
{{- else if $s.tls.secretName }}
{{- $hp = add1 $port }}
{{- end }}
{{- if and $s.tls.secretName (eq $hp $port) }}
{{- fail "with TLS (serve.tls.secretName) the kubelet probes need a plaintext serve.healthPort other than serve.port" }}
{{- end }}
{{- if gt $hp 65535 }}
{{- fail (printf "serve.healthPort: serve.port + 1 = %d is not a port; set serve.healthPort" $hp) }}
{{- end }}
{{- $hp }}
{{- end }}

{{- define "knnlm-vdb.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- .Values.serviceAccount.name | default (include "knnlm-vdb.fullname" .) }}
{{- else }}
{{- .Values.serviceAccount.name | default "default" }}
{{- end }}
{{- end }}

{{/* The pod label the NetworkPolicy admits to serve's gRPC port: <fullname>-client by default. */}}
{{- define "knnlm-vdb.clientLabel" -}}
{{- .Values.networkPolicy.clientLabel | default (printf "%s-client" (include "knnlm-vdb.fullname" .)) }}
{{- end }}

{{/* "true" when the NetworkPolicy renders: networkPolicy.enabled, or when that is empty, whenever serve
runs plaintext without tokens (--insecure). */}}
{{- define "knnlm-vdb.networkPolicyEnabled" -}}
{{- $e := .Values.networkPolicy.enabled }}
{{- if kindIs "invalid" $e }}
{{- ternary "true" "false" (eq (include "knnlm-vdb.serveInsecure" . | trim) "true") }}
{{- else }}
{{- ternary "true" "false" $e }}
{{- end }}
{{- end }}
