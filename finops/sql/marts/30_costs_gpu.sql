-- Cost marts, step 1: what the GPUs cost, hour by hour.
--
-- Formulas (one row per GPU, or MIG instance, and pod holding it, per clock hour it
-- reported):
--   gpu_hours        = 1.0  (a GPU that reported any sample in an hour is billed for
--                       that hour, as an instance is billed while it is up); a GPU split
--                       by MIG bills its hour once, shared by its reporting instances in
--                       proportion to their compute slices (mig_profile '3g.40gb' = 3),
--                       evenly when a profile does not say; then times the pod's share
--                       of the hour (marts.gpu_pod_share_hourly: pods sharing a GPU by
--                       time-slicing split it), so a GPU-hour's rows sum to 1.0
--   usd_per_gpu_hour = ref.prices for (gpu_model, pricing_kind); model names match
--                       with the 'NVIDIA ' prefix stripped, exactly, or the catalog
--                       name is a prefix of the reported one ending on a word boundary
--                       (L4 never prices L40S); blank never matches. Same rule as
--                       finops.prices.model_matches; exact wins, then the longest name
--   pricing_kind     = the deployment rule's kind (ref.deployments), else the session
--                       variable finops_pricing_kind, else 'on_demand'
--   gpu_cost         = gpu_hours x usd_per_gpu_hour            (the bill)
--   util             = marts.gpu_util_hourly.util clamped to 0..1 (SM activity when the
--                       exporter has it; util_signal names the signal); 0 when absent
--   busy_cost        = util x gpu_cost                          (usage basis)
--   idle_cost        = gpu_cost - busy_cost                     (idle capacity)
-- Tier: the first matching ref.deployments rule (lowest priority number), else the
-- pod label `tier` (or `finops.dev/tier`, or `finops_dev_tier` as dcgm-exporter's
-- --kubernetes-enable-pod-labels sanitises it), else the `app` label, else no tier
-- (such GPUs are never allocated to requests: their cost stays unallocated).

-- User mapping from pods/labels to deployments and tiers (finops.costs.load_deployments
-- fills it from a TOML file, see data/deployments.example.toml). A NULL match column
-- matches anything; pod_glob uses GLOB syntax (vllm-small-*).
CREATE TABLE IF NOT EXISTS ref.deployments (
    priority INTEGER,
    namespace VARCHAR,
    pod_glob VARCHAR,
    label_key VARCHAR,
    label_value VARCHAR,
    gpu_model VARCHAR,
    deployment VARCHAR,
    tier VARCHAR,
    pricing_kind VARCHAR
);

-- Hourly GPU signals from clean.gpu_device_samples, same rules as marts.gpu_hourly
-- (util = SM_ACTIVE > GR_ENGINE_ACTIVE > GPU_UTIL/100). It reads the deduplicated layer:
-- a partly re-written flush duplicates only some samples, which would skew the average.
-- A GPU-hour exists when the GPU reported any field (power alone still bills the hour).
-- A GPU is its UUID: one row per (hour, gpu_uuid, mig_instance) whatever `host` said
-- (dcgm-exporter's Hostname is often its own pod name, which a DaemonSet rollout changes
-- mid-hour; billing per host would bill that hour twice). `host` is the latest one seen.
CREATE OR REPLACE VIEW marts.gpu_util_hourly AS
WITH per_field AS (
    SELECT date_trunc('hour', ts) AS hour, gpu_uuid,
           coalesce(mig_instance, '') AS mig_instance, field,
           arg_max(host, ts) AS host, max(ts) AS last_ts,
           any_value(gpu_model) AS gpu_model, any_value(mig_profile) AS mig_profile,
           any_value(namespace) AS namespace,
           any_value(pod) AS pod, any_value(labels) AS labels,
           avg(value) AS avg_value
    FROM clean.gpu_device_samples
    GROUP BY hour, gpu_uuid, coalesce(mig_instance, ''), field
),
wide AS (
    SELECT hour, arg_max(host, last_ts) AS host, gpu_uuid, mig_instance,
           any_value(gpu_model) AS gpu_model, any_value(mig_profile) AS mig_profile,
           any_value(namespace) AS namespace,
           any_value(pod) AS pod, any_value(labels) AS labels,
           max(avg_value) FILTER (field = 'DCGM_FI_PROF_SM_ACTIVE') AS sm_active,
           max(avg_value) FILTER (field = 'DCGM_FI_PROF_GR_ENGINE_ACTIVE') AS gr_engine_active,
           max(avg_value) FILTER (field IN ('DCGM_FI_DEV_GPU_UTIL', 'nvml_gpu_util_percent'))
               / 100.0::DOUBLE AS gpu_util
    FROM per_field
    GROUP BY hour, gpu_uuid, mig_instance
)
SELECT *,
    coalesce(json_extract_string(labels, '$.tier'),
             json_extract_string(labels, '$."finops.dev/tier"'),
             json_extract_string(labels, '$.finops_dev_tier')) AS tier,
    coalesce(sm_active, gr_engine_active, gpu_util) AS util,
    CASE WHEN sm_active IS NOT NULL THEN 'DCGM_FI_PROF_SM_ACTIVE'
         WHEN gr_engine_active IS NOT NULL THEN 'DCGM_FI_PROF_GR_ENGINE_ACTIVE'
         WHEN gpu_util IS NOT NULL THEN 'DCGM_FI_DEV_GPU_UTIL'
    END AS util_signal
FROM wide;

-- Who held each GPU-hour: a GPU shared by pods (time-slicing, MPS; dcgm-exporter repeats
-- the device's fields under each pod's labels) is split between them, evenly at each sample
-- instant among the pods it was exported for then, and those instants weigh alike:
--   share(pod) = sum over the hour's instants where the pod held the GPU of 1 / holders
--                / instants in the hour
-- so a pod present the whole hour next to one present half of it carries 0.75. A pod that
-- replaced another mid-hour on an unshared GPU carries its part of the hour. The shares of
-- a GPU-hour sum to 1; a GPU no pod held is one row with a null pod. The device's
-- utilization is not split: DCGM cannot tell which pod kept the SMs busy.
CREATE OR REPLACE VIEW marts.gpu_pod_share_hourly AS
-- Read from raw (with clean's value rule): a sample loaded twice changes nobody's presence,
-- and skipping the dedup keeps this view cheap. Most GPU-hours have one holder and take
-- the first branch; only shared ones are weighed instant by instant.
WITH samples AS (
    SELECT date_trunc('hour', ts) AS hour, gpu_uuid, coalesce(mig_instance, '') AS mig_instance,
           ts, source, field, namespace, pod, labels
    FROM raw.gpu_samples
    WHERE value IS NOT NULL AND NOT isnan(value)
),
per_series AS (  -- each series' pods in each GPU-hour (a series: source and field)
    SELECT hour, gpu_uuid, mig_instance, source, field, namespace, pod,
           any_value(labels) AS labels
    FROM samples
    GROUP BY ALL
),
naming AS (
    -- only series that attribute the GPU to pods say who held it: NVML next to
    -- dcgm-exporter, or an XID counter, never name a pod, and their instants would
    -- otherwise hand the hour to nobody at whatever rate they are sampled
    SELECT * EXCLUDE (any_names_pods)
    FROM (SELECT *, bool_or(names_pods) OVER (PARTITION BY hour, gpu_uuid, mig_instance)
                        AS any_names_pods
          FROM (SELECT *, bool_or(pod IS NOT NULL) OVER (
                              PARTITION BY hour, gpu_uuid, mig_instance, source, field)
                              AS names_pods
                FROM per_series))
    WHERE names_pods OR NOT any_names_pods
),
holders AS (
    SELECT *, count(*) OVER (PARTITION BY hour, gpu_uuid, mig_instance) AS n_holders
    FROM (SELECT hour, gpu_uuid, mig_instance, namespace, pod, any_value(labels) AS labels
          FROM naming GROUP BY hour, gpu_uuid, mig_instance, namespace, pod)
),
seen AS (  -- shared GPU-hours only: who held the GPU at each instant, by the naming series
    SELECT DISTINCT s.hour, s.gpu_uuid, s.mig_instance, s.ts, s.namespace, s.pod
    FROM samples s
    SEMI JOIN (SELECT DISTINCT n.hour, n.gpu_uuid, n.mig_instance, n.source, n.field
               FROM naming n
               SEMI JOIN (SELECT * FROM holders WHERE n_holders > 1) h
                   USING (hour, gpu_uuid, mig_instance)) k
        USING (hour, gpu_uuid, mig_instance, source, field)
),
held AS (
    -- a row without a pod next to rows with one at the same instant is no holder (a
    -- field the exporter does not attribute to pods)
    SELECT * EXCLUDE (pods_then), greatest(pods_then, 1) AS at_once,
           count(DISTINCT ts) OVER (PARTITION BY hour, gpu_uuid, mig_instance) AS instants
    FROM (SELECT *, count(pod) OVER (PARTITION BY gpu_uuid, mig_instance, ts) AS pods_then
          FROM seen)
    WHERE pod IS NOT NULL OR pods_then = 0
),
shared AS (
    SELECT hour, gpu_uuid, mig_instance, namespace, pod,
           sum(1.0::DOUBLE / at_once) / any_value(instants) AS share
    FROM held GROUP BY ALL
)
SELECT h.hour, h.gpu_uuid, h.mig_instance, h.namespace, h.pod, h.labels,
       CASE WHEN h.n_holders = 1 THEN 1.0::DOUBLE ELSE s.share END AS share
FROM holders h
LEFT JOIN shared s
    ON s.hour = h.hour AND s.gpu_uuid = h.gpu_uuid AND s.mig_instance = h.mig_instance
   AND s.namespace IS NOT DISTINCT FROM h.namespace AND s.pod IS NOT DISTINCT FROM h.pod
WHERE h.n_holders = 1 OR s.share IS NOT NULL;

CREATE OR REPLACE VIEW marts.gpu_cost_hourly AS
WITH sliced AS (
    -- A MIG profile names its compute slices first: '3g.40gb' holds 3 of the GPU's 7.
    SELECT * EXCLUDE (namespace, pod, labels, tier),
           CASE WHEN mig_instance <> ''
                THEN TRY_CAST(regexp_extract(mig_profile, '^\s*(\d+)g\.', 1) AS DOUBLE)
           END AS slices
    FROM marts.gpu_util_hourly
),
instance_hours AS (
    -- A MIG-partitioned GPU is one GPU on the bill: its hour is split across the instances
    -- that reported (a parent row next to them gets none), never billed per slice. The
    -- split follows the instances' compute slices when every profile names them, so a 4g
    -- instance carries twice a 2g one; otherwise it is even.
    SELECT *,
           count(*) FILTER (mig_instance <> '') OVER gpu AS n_mig,
           count(slices) FILTER (slices > 0) OVER gpu AS n_sliced,
           sum(slices) FILTER (slices > 0) OVER gpu AS all_slices
    FROM sliced
    WINDOW gpu AS (PARTITION BY hour, gpu_uuid)
),
g AS (
    -- then each instance's (or whole GPU's) hour is split between the pods that held it
    SELECT i.*, s.namespace, s.pod, s.labels, s.share,
           CASE WHEN n_mig = 0 THEN 1.0::DOUBLE
                WHEN i.mig_instance = '' THEN 0.0::DOUBLE
                WHEN n_sliced = n_mig THEN slices / all_slices
                ELSE 1.0::DOUBLE / n_mig END * s.share AS gh,
           coalesce(json_extract_string(s.labels, '$.tier'),
                    json_extract_string(s.labels, '$."finops.dev/tier"'),
                    json_extract_string(s.labels, '$.finops_dev_tier')) AS tier
    FROM instance_hours i
    JOIN marts.gpu_pod_share_hourly s USING (hour, gpu_uuid, mig_instance)
),
matched AS (
    SELECT g.*,
           d.deployment AS map_deployment, d.tier AS map_tier, d.pricing_kind AS map_kind
    FROM g
    LEFT JOIN ref.deployments d
      ON (d.namespace IS NULL OR d.namespace = g.namespace)
     AND (d.pod_glob IS NULL OR g.pod GLOB d.pod_glob)
     AND (d.gpu_model IS NULL OR g.gpu_model = d.gpu_model)
     AND (d.label_key IS NULL
          OR json_extract_string(g.labels, '$."' || d.label_key || '"') = d.label_value)
    QUALIFY row_number() OVER (
        PARTITION BY g.hour, g.gpu_uuid, g.mig_instance, g.namespace, g.pod
        ORDER BY d.priority NULLS LAST) = 1
),
resolved AS (
    SELECT *,
           coalesce(map_tier, tier, json_extract_string(labels, '$.app')) AS cost_tier,
           coalesce(map_deployment, json_extract_string(labels, '$.app'), pod) AS deployment,
           coalesce(map_kind, CAST(getvariable('finops_pricing_kind') AS VARCHAR), 'on_demand')
               AS pricing_kind,
           regexp_replace(trim(gpu_model), '^NVIDIA\s+', '') AS model_key
    FROM matched
),
hours AS (
    SELECT r.*, p.usd_per_gpu_hour,
           least(greatest(coalesce(r.util, 0.0::DOUBLE), 0.0::DOUBLE), 1.0::DOUBLE) AS util01
    FROM resolved r
    LEFT JOIN (SELECT *, regexp_replace(trim(gpu_model), '^NVIDIA\s+', '') AS cat_key
               FROM ref.prices) p
      ON p.pricing_kind = r.pricing_kind
     AND p.cat_key <> '' AND r.model_key <> ''
     AND (p.cat_key = r.model_key
          OR (starts_with(r.model_key, p.cat_key)
              AND NOT regexp_matches(substr(r.model_key, length(p.cat_key) + 1, 1), '[A-Za-z0-9]')))
    QUALIFY row_number() OVER (
        PARTITION BY r.hour, r.gpu_uuid, r.mig_instance, r.namespace, r.pod
        ORDER BY (p.cat_key = r.model_key) DESC, length(p.cat_key) DESC) = 1
)
SELECT
    hour, host, gpu_uuid, mig_instance, mig_profile, gpu_model, namespace, pod, deployment,
    cost_tier AS tier, pricing_kind, usd_per_gpu_hour,
    gh AS gpu_hours,
    util_signal,
    util01 AS util,
    sm_active, gpu_util,
    gh * usd_per_gpu_hour AS gpu_cost,
    util01 * gh * usd_per_gpu_hour AS busy_cost,
    gh * usd_per_gpu_hour - util01 * gh * usd_per_gpu_hour AS idle_cost,
    util01 * gh AS busy_gpu_hours,
    gh - util01 * gh AS idle_gpu_hours
FROM hours;

-- One row per tier per hour: the cost pool that requests of that tier-hour share.
-- GPUs without a price are counted in unpriced_gpu_hours. A tier-hour none of whose GPUs
-- has a price has an unknown cost (NULL), as one without GPU data has: its requests get
-- NULL cost and finops.costs counts them as unpriced, so a tier on an unpriced GPU model
-- never reads as $0 per request. One partly priced sums the priced GPUs (finops.costs
-- states the unpriced GPU-hours as a missing source).
CREATE OR REPLACE VIEW marts.tier_cost_hourly AS
SELECT
    hour, tier,
    count(DISTINCT gpu_uuid) AS gpus,
    sum(gpu_hours) AS gpu_hours,
    sum(gpu_hours) FILTER (usd_per_gpu_hour IS NULL) AS unpriced_gpu_hours,
    sum(busy_gpu_hours) AS busy_gpu_hours,
    sum(idle_gpu_hours) AS idle_gpu_hours,
    CASE WHEN count(usd_per_gpu_hour) > 0 THEN coalesce(sum(gpu_cost), 0.0::DOUBLE) END
        AS gpu_cost,
    CASE WHEN count(usd_per_gpu_hour) > 0 THEN coalesce(sum(busy_cost), 0.0::DOUBLE) END
        AS busy_cost,
    CASE WHEN count(usd_per_gpu_hour) > 0 THEN coalesce(sum(idle_cost), 0.0::DOUBLE) END
        AS idle_cost,
    sum(sm_active * gpu_hours) / nullif(sum(gpu_hours) FILTER (sm_active IS NOT NULL), 0) AS sm_active,
    sum(gpu_util * gpu_hours) / nullif(sum(gpu_hours) FILTER (gpu_util IS NOT NULL), 0) AS gpu_util
FROM marts.gpu_cost_hourly
GROUP BY ALL;

-- Measured prefill vs decode seconds per tier-hour, from vLLM's
-- vllm:request_prefill_time_seconds / vllm:request_decode_time_seconds histograms
-- (increase of _sum, resets handled by clean.serving_increase). Tier: the series'
-- `tier` label (a Prometheus pod label, or a vllm target's `tier` in collectors.toml),
-- else the tier of the GPU pod named by its `pod` label, else by the first DNS label of
-- its target's host: a scraped vLLM's target is its URL, and a pod's DNS name (or a
-- headless service's) starts with the pod name (http://vllm-mid-0.vllm.ns.svc:8000/metrics
-- -> vllm-mid-0). An IP address names no pod.
CREATE OR REPLACE VIEW marts.tier_phase_hourly AS
WITH pods AS (
    SELECT DISTINCT pod, tier FROM marts.gpu_cost_hourly WHERE pod IS NOT NULL AND tier IS NOT NULL
),
s AS (
    SELECT date_trunc('hour', ts) AS hour, metric, increase,
           coalesce(json_extract_string(labels, '$.tier'),
                    json_extract_string(labels, '$."finops.dev/tier"'),
                    json_extract_string(labels, '$.finops_dev_tier')) AS label_tier,
           coalesce(nullif(json_extract_string(labels, '$.pod'), ''),
                    CASE WHEN NOT regexp_matches(target, '(?i)^(?:[a-z][a-z0-9+.-]*://)?(?:[^@/]*@)?(?:\[|[0-9.]+(?:[:/]|$))')
                         THEN nullif(lower(regexp_extract(
                             target, '(?i)^(?:[a-z][a-z0-9+.-]*://)?(?:[^@/]*@)?([^./:?#@]*)', 1)), '')
                    END) AS pod
    FROM clean.serving_increase
    WHERE metric IN ('vllm:request_prefill_time_seconds_sum',
                     'vllm:request_decode_time_seconds_sum')
)
SELECT
    s.hour, coalesce(s.label_tier, p.tier) AS tier,
    sum(s.increase) FILTER (s.metric = 'vllm:request_prefill_time_seconds_sum') AS prefill_s,
    sum(s.increase) FILTER (s.metric = 'vllm:request_decode_time_seconds_sum') AS decode_s
FROM s
LEFT JOIN pods p ON lower(p.pod) = lower(s.pod)
WHERE coalesce(s.label_tier, p.tier) IS NOT NULL
GROUP BY ALL;
