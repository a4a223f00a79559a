-- Mart: one row per GPU (or MIG instance) per hour.
-- Utilization means SM activity when the exporter has it: DCGM_FI_PROF_SM_ACTIVE,
-- else DCGM_FI_PROF_GR_ENGINE_ACTIVE, else DCGM_FI_DEV_GPU_UTIL (which only says
-- a kernel was running, so it flatters). `util_signal` says which one was used;
-- `util` is a 0-1 ratio whatever the signal. A GPU is its UUID: one row per (hour,
-- gpu_uuid, mig_instance) even when its `host` label changed within the hour (an
-- exporter pod replaced mid-hour); `host` is the latest one seen.
-- A GPU shared by pods (time-slicing) is exported once per pod with the same device
-- values: one reading per instant is averaged (clean.gpu_device_samples), and `pod`/`tier`
-- name one of the pods; marts.gpu_cost_hourly splits the hour between them.
CREATE OR REPLACE VIEW marts.gpu_hourly AS
WITH per_field AS (
    SELECT
        date_trunc('hour', ts) AS hour,
        gpu_uuid, coalesce(mig_instance, '') AS mig_instance,
        arg_max(host, ts) AS host, max(ts) AS last_ts,
        any_value(gpu_model) AS gpu_model,
        any_value(mig_profile) AS mig_profile,
        any_value(namespace) AS namespace,
        any_value(pod) AS pod,
        any_value(labels) AS labels,
        field,
        avg(value) AS avg_value,
        count(*) AS samples
    FROM clean.gpu_device_samples
    GROUP BY hour, gpu_uuid, coalesce(mig_instance, ''), field
),
wide AS (
    SELECT
        hour, arg_max(host, last_ts) AS host, gpu_uuid, mig_instance,
        any_value(gpu_model) AS gpu_model,
        any_value(mig_profile) AS mig_profile,
        any_value(namespace) AS namespace,
        any_value(pod) AS pod,
        any_value(labels) AS labels,
        max(avg_value) FILTER (field IN ('DCGM_FI_PROF_SM_ACTIVE')) AS sm_active,
        max(avg_value) FILTER (field IN ('DCGM_FI_PROF_GR_ENGINE_ACTIVE')) AS gr_engine_active,
        max(avg_value) FILTER (field IN ('DCGM_FI_PROF_PIPE_TENSOR_ACTIVE')) AS tensor_active,
        max(avg_value) FILTER (field IN ('DCGM_FI_DEV_GPU_UTIL', 'nvml_gpu_util_percent')) / 100.0 AS gpu_util,
        max(avg_value) FILTER (field IN ('DCGM_FI_DEV_FB_USED', 'nvml_memory_used_mib')) AS fb_used_mib,
        max(avg_value) FILTER (field IN ('DCGM_FI_DEV_POWER_USAGE', 'nvml_power_w')) AS power_w,
        sum(samples) AS samples
    FROM per_field
    GROUP BY hour, gpu_uuid, mig_instance
),
energy_by_source AS (
    SELECT date_trunc('hour', ts) AS hour, gpu_uuid, coalesce(mig_instance, '') AS mig_instance,
           source, field, sum(increase) / 3.6e9 AS energy_kwh
    FROM clean.gpu_counter_increase
    GROUP BY ALL
),
-- DCGM and NVML both reading the same GPU measure the same joules: keep one
-- source's counter per GPU-hour (DCGM first, then NVML), never their sum.
energy AS (
    SELECT hour, gpu_uuid, mig_instance, energy_kwh
    FROM energy_by_source
    QUALIFY row_number() OVER (
        PARTITION BY hour, gpu_uuid, mig_instance
        ORDER BY (field = 'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION') DESC, source, field) = 1
)
SELECT
    w.hour, w.host, w.gpu_uuid, w.mig_instance, w.mig_profile, w.gpu_model, w.namespace, w.pod,
    coalesce(json_extract_string(w.labels, '$.tier'), json_extract_string(w.labels, '$."finops.dev/tier"'),
             json_extract_string(w.labels, '$.finops_dev_tier')) AS tier,
    coalesce(w.sm_active, w.gr_engine_active, w.gpu_util) AS util,
    CASE WHEN w.sm_active IS NOT NULL THEN 'DCGM_FI_PROF_SM_ACTIVE'
         WHEN w.gr_engine_active IS NOT NULL THEN 'DCGM_FI_PROF_GR_ENGINE_ACTIVE'
         WHEN w.gpu_util IS NOT NULL THEN 'DCGM_FI_DEV_GPU_UTIL'
    END AS util_signal,
    w.sm_active, w.gr_engine_active, w.tensor_active, w.gpu_util,
    w.fb_used_mib, w.power_w, e.energy_kwh, w.samples
FROM wide w
LEFT JOIN energy e USING (hour, gpu_uuid, mig_instance);
