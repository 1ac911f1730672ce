{{/* ======================================================= render pools and the model catalog */}}

{{/* Where the catalog ConfigMap is mounted, and the file EDITFARM_MODELS_FILE names. */}}
{{- define "editfarm.catalogDir" -}}/etc/editfarm{{- end }}
{{- define "editfarm.catalogFile" -}}/etc/editfarm/models.yaml{{- end }}

{{/* "true" when values.models holds a catalog (rendered into the <fullname>-models ConfigMap). */}}
{{- define "editfarm.hasCatalog" -}}
{{- if trim (toString (default "" .Values.models)) }}true{{ end }}
{{- end }}

{{/*
env entries naming the model configuration of a process: EDITFARM_MODELS_FILE when the chart
carries a catalog (EDITFARM_MODEL must then stay unset: the code refuses both), else
EDITFARM_MODEL (the one-model catalog whose model is named "default").
*/}}
{{- define "editfarm.env.models" -}}
{{- if include "editfarm.hasCatalog" . }}
- name: EDITFARM_MODELS_FILE
  value: {{ include "editfarm.catalogFile" . | quote }}
{{- else }}
- name: EDITFARM_MODEL
  value: {{ .Values.model.name | quote }}
{{- end }}
{{- end }}

{{/* The catalog volume and its mount (a pod's volumes / a container's volumeMounts). */}}
{{- define "editfarm.catalogVolume" -}}
- name: catalog
  configMap:
    name: {{ include "editfarm.fullname" . }}-models
{{- end }}
{{- define "editfarm.catalogMount" -}}
- name: catalog
  mountPath: {{ include "editfarm.catalogDir" . }}
  readOnly: true
{{- end }}

{{/*
A name "<prefix>-<model>" within 63 characters: the prefix is shortened, never the model, so
two pools never collide. (dict "prefix" "ef-editfarm-render-worker" "model" "qwen-image")
*/}}
{{- define "editfarm.poolName" -}}
{{- $room := sub 62 (len .model) | int }}
{{- printf "%s-%s" (.prefix | trunc $room | trimSuffix "-") .model }}
{{- end }}

{{/*
The catalog's model names, checked: (dict "ctx" $ "out" $out) sets $out.names (a list; empty
without a catalog). A helper cannot return a list, so it fills the dict it is given.
*/}}
{{- define "editfarm.catalogNames" -}}
{{- $ctx := .ctx }}
{{- $names := list }}
{{- if include "editfarm.hasCatalog" $ctx }}
{{- $catalog := fromYaml (toString $ctx.Values.models) }}
{{- if hasKey $catalog "Error" }}
{{- fail (printf "models: not a YAML catalog (%s); give the catalog file's content, e.g. --set-file models=examples/models.yaml" $catalog.Error) }}
{{- end }}
{{- if not (kindIs "slice" $catalog.models) }}
{{- fail "models: the catalog needs a top-level `models:` list (see examples/models.yaml, docs/models.md)" }}
{{- end }}
{{- range $i, $entry := $catalog.models }}
{{- if not (and (kindIs "map" $entry) $entry.name) }}
{{- fail (printf "models: entry %d has no name" $i) }}
{{- end }}
{{- $names = append $names (toString $entry.name) }}
{{- end }}
{{- end }}
{{- $_ := set .out "names" $names }}
{{- end }}

{{/*
The render-worker pools, as the templates use them: (dict "ctx" $ "out" $out) sets $out.pools.
Without renderPools this is the one pool of the single-model chart, rendered as before (no
model label, no --model, EDITFARM_MODEL or the catalog). With renderPools, one pool per entry,
its unset keys taken from renderWorker.*, keda.* and model.*. Each pool is a dict:
  name        Deployment / PDB / ScaledObject name
  model       the catalog name ("" = the single pool)
  selector    extra selector labels ({} or {editfarm.io/model: <model>})
  replicas, keda (the effective keda.* of the pool), lists ([trigger name, Redis list] x 4)
  resources, nodeSelector, tolerations, affinity, profile, env
  volume      source, mountPath, readOnly, claimName, createClaim, hostPath, emptyDirSizeLimit, pvc
  args        the container args
Invalid pools fail here, with the entry's index and the reason.
*/}}
{{- define "editfarm.renderPools" -}}
{{- $ctx := .ctx }}
{{- $rw := $ctx.Values.renderWorker }}
{{- $fullname := include "editfarm.fullname" $ctx }}
{{- $names := dict }}
{{- $_ := include "editfarm.catalogNames" (dict "ctx" $ctx "out" $names) }}
{{- $catalogNames := $names.names }}
{{- $pools := list }}
{{- $entries := default (list) $ctx.Values.renderPools }}
{{- if not $entries }}
{{- if gt (len $catalogNames) 1 }}
{{- fail (printf "models names %d models (%s) but renderPools is empty: a render worker serves one model; add one renderPools entry per model to serve" (len $catalogNames) (join ", " $catalogNames)) }}
{{- end }}
{{- $entries = list (dict) }}
{{- end }}
{{- $seen := dict }}
{{- range $i, $p := $entries }}
{{- $single := not $ctx.Values.renderPools }}
{{- $model := "" }}
{{- $selector := dict }}
{{- $name := printf "%s-render-worker" $fullname }}
{{- if not $single }}
{{- $model = toString (default "" $p.model) }}
{{- if not (and (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $model) (le (len $model) 40)) }}
{{- fail (printf "renderPools[%d].model %q is not a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit, at most 40 characters (it names the pool's Deployment, its queues and the metrics' model label)" $i $model) }}
{{- end }}
{{- if hasKey $seen $model }}
{{- fail (printf "renderPools[%d].model %q: a second pool for the same model (one pool per model; raise its replicas instead)" $i $model) }}
{{- end }}
{{- $_ := set $seen $model true }}
{{- if $catalogNames }}
{{- if not (has $model $catalogNames) }}
{{- fail (printf "renderPools[%d].model %q is not in the catalog (models names: %s)" $i $model (join ", " $catalogNames)) }}
{{- end }}
{{- else if ne $model "default" }}
{{- fail (printf "renderPools[%d].model %q: without a catalog (values.models) the only model is \"default\" (model.name); set models to serve named models" $i $model) }}
{{- end }}
{{- $selector = dict "editfarm.io/model" $model }}
{{- $name = include "editfarm.poolName" (dict "prefix" (printf "%s-render-worker" $fullname) "model" $model) }}
{{- end }}

{{- /* KEDA: each key of the pool's keda wins over keda.* (hasKey: false and 0 are values too) */}}
{{- $g := $ctx.Values.keda }}
{{- $pk := default (dict) $p.keda }}
{{- $k := dict }}
{{- range $key := list "enabled" "minReplicas" "maxReplicas" "pollingIntervalSeconds" "cooldownPeriodSeconds" "jobsPerWorker" "scalingModifiers" }}
{{- $_ := set $k $key (ternary (index $pk $key) (index $g $key) (hasKey $pk $key)) }}
{{- end }}
{{- $psd := default (dict) $pk.scaleDown }}
{{- $sd := dict }}
{{- range $key := list "stabilizationWindowSeconds" "pods" "periodSeconds" }}
{{- $_ := set $sd $key (ternary (index $psd $key) (index $g.scaleDown $key) (hasKey $psd $key)) }}
{{- end }}
{{- $_ := set $k "scaleDown" $sd }}
{{- if and $k.enabled (gt (int $k.minReplicas) (int $k.maxReplicas)) }}
{{- fail (printf "%s: minReplicas (%v) above maxReplicas (%v)" (ternary "keda" (printf "renderPools[%d].keda" $i) $single) $k.minReplicas $k.maxReplicas) }}
{{- end }}

{{- /* The model's three render queues and its in-flight list (broker/keys.py); the model
       named "default" keeps the single-model names. */}}
{{- $listModel := $model }}
{{- if and $single (eq (len $catalogNames) 1) }}
{{- /* the single pool of a one-model catalog serves that model, and its queues are that model's */}}
{{- $listModel = first $catalogNames }}
{{- end }}
{{- $queue := "render" }}
{{- $inflight := "editfarm:inflight" }}
{{- if and $listModel (ne $listModel "default") }}
{{- $queue = printf "render.%s" $listModel }}
{{- $inflight = printf "editfarm:inflight:%s" $listModel }}
{{- end }}
{{- $lists := list (list "render_high" (printf "%s.high" $queue)) (list "render_normal" (printf "%s.normal" $queue)) (list "render_low" (printf "%s.low" $queue)) (list "inflight" $inflight) }}

{{- /* The weights volume: model.* (shared), or the pool's own modelVolume (unset keys from
       model.*, except pvc.existingClaim: empty = a claim of its own). */}}
{{- $m := $ctx.Values.model }}
{{- $own := hasKey $p "modelVolume" }}
{{- $pv := default (dict) $p.modelVolume }}
{{- $vol := dict }}
{{- range $key := list "source" "mountPath" "readOnly" "emptyDirSizeLimit" }}
{{- $_ := set $vol $key (ternary (index $pv $key) (index $m $key) (hasKey $pv $key)) }}
{{- end }}
{{- $pvc := dict }}
{{- $ppvc := default (dict) $pv.pvc }}
{{- range $key := list "existingClaim" "size" "storageClassName" "accessModes" }}
{{- $_ := set $pvc $key (ternary (index $ppvc $key) (index $m.pvc $key) (hasKey $ppvc $key)) }}
{{- end }}
{{- if and $own (not (hasKey $ppvc "existingClaim")) }}
{{- $_ := set $pvc "existingClaim" "" }}
{{- end }}
{{- $hp := dict }}
{{- $php := default (dict) $pv.hostPath }}
{{- range $key := list "path" "type" }}
{{- $_ := set $hp $key (ternary (index $php $key) (index $m.hostPath $key) (hasKey $php $key)) }}
{{- end }}
{{- $claim := printf "%s-models" $fullname }}
{{- if $own }}
{{- $claim = include "editfarm.poolName" (dict "prefix" (printf "%s-models" $fullname) "model" $model) }}
{{- end }}
{{- $_ := set $vol "pvc" $pvc }}
{{- $_ := set $vol "hostPath" $hp }}
{{- $_ := set $vol "own" $own }}
{{- $_ := set $vol "createClaim" (and (eq $vol.source "pvc") (not $pvc.existingClaim)) }}
{{- $_ := set $vol "claimName" (default $claim $pvc.existingClaim) }}
{{- $_ := set $vol "readOnly" (and $vol.readOnly (ne $vol.source "emptyDir")) }}

{{- $args := list "worker" "--gpus" "all" }}
{{- if not $single }}
{{- $args = list "worker" "--model" $model "--gpus" "all" }}
{{- end }}
{{- $pool := dict "name" $name "model" $model "selector" $selector "args" $args "lists" $lists "keda" $k "volume" $vol }}
{{- $_ := set $pool "replicas" (ternary $p.replicas $rw.replicaCount (hasKey $p "replicas")) }}
{{- range $key := list "resources" "nodeSelector" "tolerations" "affinity" }}
{{- $_ := set $pool $key (ternary (index $p $key) (index $rw $key) (hasKey $p $key)) }}
{{- end }}
{{- $_ := set $pool "profile" (default "" $p.profile) }}
{{- $_ := set $pool "env" (default (list) $p.env) }}
{{- $pools = append $pools $pool }}
{{- end }}
{{- $_ := set .out "pools" $pools }}
{{- end }}
