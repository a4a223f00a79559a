-- Clean layer, step 2: counters as increases, the way Prometheus rate() sees them.
-- A counter that goes down was reset (exporter or vLLM restart): the increase
-- over that interval is the new value itself, never a negative number, and
-- a restart never double counts. Histogram _bucket/_sum/_count series are
-- counters too, and so are a summary's _sum/_count; its quantile series
-- (labelled `quantile`) are gauges and are left out. `seconds` is the
-- interval the increase covers.
CREATE OR REPLACE VIEW clean.serving_increase AS
WITH s AS (
    SELECT
        ts, source, target, metric, type, labels, model_name, value,
        lag(value) OVER w AS prev_value,
        lag(ts) OVER w AS prev_ts
    FROM clean.serving_samples
    WHERE (type IN ('counter', 'histogram', 'summary')
           OR metric LIKE '%\_total' ESCAPE '\'
           OR metric LIKE '%\_bucket' ESCAPE '\'
           OR metric LIKE '%\_count' ESCAPE '\'
           OR metric LIKE '%\_sum' ESCAPE '\')
      AND metric NOT LIKE '%\_created' ESCAPE '\'
      AND NOT (type = 'summary' AND json_extract_string(labels, '$.quantile') IS NOT NULL)
      AND NOT isnan(value)
    WINDOW w AS (PARTITION BY source, target, metric, labels ORDER BY ts)
)
SELECT
    ts, source, target, metric, type, labels, model_name, value,
    prev_ts,
    epoch(ts - prev_ts) AS seconds,
    CASE WHEN value < prev_value THEN value ELSE value - prev_value END AS increase,
    value < prev_value AS reset
FROM s
WHERE prev_value IS NOT NULL;

-- GPU counters (DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION, mJ) with the same reset rule.
-- A GPU shared by pods exports its counter once per pod: one reading per instant is kept
-- (clean.gpu_device_samples), so the device's energy is counted once.
CREATE OR REPLACE VIEW clean.gpu_counter_increase AS
WITH s AS (
    SELECT
        ts, source, host, gpu_uuid, gpu_model, mig_instance, namespace, pod, field, value,
        lag(value) OVER w AS prev_value,
        lag(ts) OVER w AS prev_ts
    FROM clean.gpu_device_samples
    WHERE field IN ('DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION', 'nvml_total_energy_consumption_mj')
    WINDOW w AS (PARTITION BY source, host, gpu_uuid, mig_instance, field ORDER BY ts)
)
SELECT
    ts, source, host, gpu_uuid, gpu_model, mig_instance, namespace, pod, field, value,
    prev_ts,
    epoch(ts - prev_ts) AS seconds,
    CASE WHEN value < prev_value THEN value ELSE value - prev_value END AS increase,
    value < prev_value AS reset
FROM s
WHERE prev_value IS NOT NULL;
