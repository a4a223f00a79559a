-- Cost marts, coverage: GPU-hours that most likely ran but were never observed.
--
-- marts.gpu_cost_hourly bills a GPU only for the hours it reported. When its exporter
-- (dcgm-exporter, NVML, the Prometheus it is read from) or the collector itself is down
-- for hours, those hours drop out of spend without a word and cost per request looks
-- cheaper. A GPU that reported before and after a silent stretch almost surely kept
-- running (an instance bills while it is up), so this view lists those hours, one row
-- per GPU (gpu_uuid, mig_instance as marts.gpu_cost_hourly keys it) per gap hour:
--   gap hour         = a clock hour strictly between the GPU's first and last reporting
--                       hour in the lake in which it has no row. Hours before its first
--                       or after its last report are no gaps (it started later, was
--                       decommissioned, or the lake ends); a node drained and brought
--                       back also shows here, hence "most likely". A collector still
--                       down where the lake ends shows nothing here.
--   prev_hour, next_hour = its reporting hours around the gap; host, gpu_model,
--                       mig_profile, tier and pricing_kind are those of prev_hour
--   usd_per_gpu_hour = the price it had in prev_hour (next_hour when prev_hour had none):
--                       gpu_cost / gpu_hours of that hour, the catalog price if the hour
--                       carried no GPU-hours (a MIG parent row)
--   est_gpu_hours    = the GPU-hours it carried in prev_hour, summed over the pods that
--                       held it: 1.0 for a whole GPU, its share for a MIG instance; 0 when
--                       the same GPU reported in the gap hour through another MIG instance
--                       or its parent row (gpu_reported): that hour is billed already, to them
--   est_cost         = est_gpu_hours x usd_per_gpu_hour: about what the bill leaves out
--                       (NULL when unpriced)
-- Presence is DISTINCT (hour, gpu_uuid, mig_instance): marts.gpu_cost_hourly has a row
-- per pod holding a GPU-hour, so its rows are never counted.
-- Why the hour was silent, from clean.scrape_health rows of the kinds that carry GPU
-- metrics (dcgm, nvml, prometheus; a prometheus target may carry vLLM series only and is
-- listed all the same). They are joined per clock hour, not per GPU: a target is named
-- by its URL or config name while a GPU's host is dcgm-exporter's Hostname (often its
-- own pod name), so matching the two would be a guess:
--   gpu_scrapes      = GPU-kind scrape attempts in the hour; 0 means no collector wrote
--                       health then (it was stopped, or the data came from elsewhere)
--   down_attempts    = those of them with up = false; down_targets: their targets
--   last_error       = the error of the hour's last failed attempt
CREATE OR REPLACE VIEW marts.gpu_gap_hourly AS
WITH present AS (
    SELECT hour, gpu_uuid, mig_instance,
           any_value(host) AS host, any_value(gpu_model) AS gpu_model,
           any_value(mig_profile) AS mig_profile,
           arg_max(tier, gpu_hours) AS tier, arg_max(pricing_kind, gpu_hours) AS pricing_kind,
           sum(gpu_hours) AS gpu_hours,
           coalesce(sum(gpu_cost) / nullif(sum(gpu_hours), 0), max(usd_per_gpu_hour))
               AS usd_per_gpu_hour
    FROM marts.gpu_cost_hourly
    GROUP BY hour, gpu_uuid, mig_instance
),
spans AS (
    SELECT gpu_uuid, mig_instance, min(hour) AS first_hour, max(hour) AS last_hour
    FROM present
    GROUP BY gpu_uuid, mig_instance
),
gaps AS (
    SELECT * FROM (
        SELECT gpu_uuid, mig_instance,
               unnest(range(first_hour + INTERVAL 1 HOUR, last_hour, INTERVAL 1 HOUR)) AS hour
        FROM spans
        WHERE last_hour > first_hour + INTERVAL 1 HOUR
    ) c
    ANTI JOIN present p USING (hour, gpu_uuid, mig_instance)
),
around AS (
    SELECT g.hour, g.gpu_uuid, g.mig_instance, b.hour AS prev_hour,
           b.host, b.gpu_model, b.mig_profile, b.tier, b.pricing_kind,
           b.gpu_hours AS prev_gpu_hours, b.usd_per_gpu_hour AS prev_price
    FROM gaps g
    ASOF JOIN present b
      ON g.gpu_uuid = b.gpu_uuid AND g.mig_instance = b.mig_instance AND g.hour > b.hour
),
neighbours AS (
    SELECT a.*, n.hour AS next_hour, n.usd_per_gpu_hour AS next_price
    FROM around a
    ASOF JOIN present n
      ON a.gpu_uuid = n.gpu_uuid AND a.mig_instance = n.mig_instance AND a.hour < n.hour
),
billed AS (
    SELECT DISTINCT hour, gpu_uuid FROM present
),
health AS (
    SELECT date_trunc('hour', ts) AS hour,
           count(*) AS gpu_scrapes,
           count(*) FILTER (NOT up) AS down_attempts,
           list(DISTINCT target ORDER BY target) FILTER (NOT up) AS down_targets,
           arg_max(error, ts) FILTER (NOT up) AS last_error
    FROM clean.scrape_health
    WHERE kind IN ('dcgm', 'nvml', 'prometheus')
    GROUP BY 1
),
est AS (
    SELECT nb.*,
           o.gpu_uuid IS NOT NULL AS gpu_reported,
           coalesce(nb.prev_price, nb.next_price) AS usd_per_gpu_hour,
           CASE WHEN o.gpu_uuid IS NOT NULL THEN 0.0::DOUBLE ELSE nb.prev_gpu_hours END
               AS est_gpu_hours
    FROM neighbours nb
    LEFT JOIN billed o USING (hour, gpu_uuid)
)
SELECT
    e.hour, e.host, e.gpu_uuid, e.mig_instance, e.mig_profile, e.gpu_model, e.tier,
    e.pricing_kind, e.prev_hour, e.next_hour, e.gpu_reported,
    e.usd_per_gpu_hour, e.est_gpu_hours,
    e.est_gpu_hours * e.usd_per_gpu_hour AS est_cost,
    coalesce(h.gpu_scrapes, 0) AS gpu_scrapes,
    coalesce(h.down_attempts, 0) AS down_attempts,
    h.down_targets, h.last_error
FROM est e
LEFT JOIN health h USING (hour);
