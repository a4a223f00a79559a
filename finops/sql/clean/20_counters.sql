-- Clean layer, step 2: counters as increases, the way Prometheus rate() sees them.
-- A counter that goes down was reset (exporter or vLLM restart): the increase
-- over that interval is the new value itself, never a negative number, and
-- a restart never double counts. Histogram _bucket/_sum/_count series are
-- counters too, and so are a summary's _sum/_count; its quantile series
-- (labelled `quantile`) are gauges and are left out. `seconds` is the
-- interval the increase covers.
--
-- Increases are taken within one process. A scraped vLLM's scrape (source 'vllm')
-- has a process identity: the earliest of its `vllm:*_created` samples (when that
-- process began counting), else its process_start_time_seconds
-- (collectors/vllm.py `process_identity` computes the same). A URL that reaches
-- several replicas (a load-balancing Service) alternates between processes; taken
-- across them, each switch would read as a reset and count the other replica's
-- whole lifetime. So each series is followed per process: a reading's increase is
-- over that process's previous reading; a process's first reading counts from zero
-- if it began counting after the target's previous scrape (a restart: the interval
-- holds all it counted), and gives no increase otherwise (a replica first seen, like
-- any series' first reading). Without an identity (older payloads, Prometheus rows)
-- a series is one sequence, as before.
CREATE OR REPLACE VIEW clean.serving_increase AS
WITH x AS (
    SELECT ts, source, target, metric, type, labels, model_name, value
    FROM clean.serving_samples
    WHERE NOT isnan(value)
      AND ((type IN ('counter', 'histogram', 'summary')
            OR metric LIKE '%\_total' ESCAPE '\'
            OR metric LIKE '%\_bucket' ESCAPE '\'
            OR metric LIKE '%\_count' ESCAPE '\'
            OR metric LIKE '%\_sum' ESCAPE '\'
            OR (source = 'vllm' AND metric = 'process_start_time_seconds'))
           OR (source = 'vllm' AND metric LIKE 'vllm:%\_created' ESCAPE '\'))
),
scrapes AS (
    SELECT source, target, ts, process,
           lag(ts) OVER (PARTITION BY source, target ORDER BY ts) AS prev_scrape
    FROM (
        SELECT source, target, ts,
               coalesce(min(value) FILTER (metric LIKE '%\_created' ESCAPE '\'),
                        max(value) FILTER (metric = 'process_start_time_seconds')) AS process
        FROM x
        WHERE source = 'vllm'
          AND (metric LIKE 'vllm:%\_created' ESCAPE '\' OR metric = 'process_start_time_seconds')
        GROUP BY ALL
    )
),
s AS (
    SELECT
        x.ts, x.source, x.target, metric, type, labels, model_name, value,
        p.process, p.prev_scrape,
        lag(value) OVER w AS prev_value,
        lag(x.ts) OVER w AS prev_ts
    FROM x
    LEFT JOIN scrapes p ON p.source = x.source AND p.target = x.target AND p.ts = x.ts
    WHERE metric NOT LIKE '%\_created' ESCAPE '\'
      AND metric <> 'process_start_time_seconds'
      AND NOT (type = 'summary' AND json_extract_string(labels, '$.quantile') IS NOT NULL)
    WINDOW w AS (PARTITION BY x.source, x.target, metric, labels, p.process ORDER BY x.ts)
),
i AS (
    SELECT *,
        prev_value IS NULL AND process IS NOT NULL AND prev_scrape IS NOT NULL
            AND process > epoch(prev_scrape) AS restarted
    FROM s
)
SELECT
    ts, source, target, metric, type, labels, model_name, value,
    CASE WHEN restarted THEN prev_scrape ELSE prev_ts END AS prev_ts,
    epoch(ts - CASE WHEN restarted THEN prev_scrape ELSE prev_ts END) AS seconds,
    CASE WHEN restarted OR value < prev_value THEN value ELSE value - prev_value END AS increase,
    restarted OR value < prev_value AS reset
FROM i
WHERE prev_value IS NOT NULL OR restarted;

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
