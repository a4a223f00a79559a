-- Clean layer, step 1: one row per deterministic key.
-- Loading the same scrape or log twice leaves duplicates in raw; these views keep
-- one, so every mart above sees each sample/request once.
--
-- Logs (requests, cache events, rejects): when rows sharing a key differ, as when a
-- log is re-ingested with a corrected mapping, the latest written wins, the same on
-- every query. Lake files are named part-<write time, 20 digits>-<fingerprint>.parquet
-- (finops.lake); files of older finops versions, named without it, count as older.
-- Telemetry samples (GPU, serving, scrape health) sharing a key are reads of one
-- measurement (a re-scrape, a Prometheus backfill over a live scrape), so any copy
-- will do: ordering by write time there would cost ~3x on the largest tables.
CREATE OR REPLACE MACRO clean.write_order(f) AS
    CASE WHEN regexp_matches(f, '^part-[0-9]{20}-') THEN '1' || f ELSE '0' || f END;

-- A GPU sample's key is its whole series (finops.schemas.GPU_SAMPLES): a GPU shared by
-- pods through time-slicing or MPS is exported once per pod, identical device values
-- under each pod's labels, and XID / clock-event counters once per code; each is kept.
-- The series columns are compared through one 64-bit hash, which dedupes this largest
-- table faster than the six columns of the narrower key did (two different series of one
-- instant colliding is a ~1e-19 chance).
CREATE OR REPLACE VIEW clean.gpu_samples AS
SELECT DISTINCT ON (hash(source, host, gpu_uuid, mig_instance, namespace, pod, container,
                         labels, field), ts) * EXCLUDE (_file)
FROM raw.gpu_samples
WHERE value IS NOT NULL AND NOT isnan(value);

-- One reading per device field and instant, for device figures (utilization, power,
-- memory, energy): a shared GPU's per-pod copies are one measurement, and averaging all
-- of them would weigh an instant by how many pods held the GPU then. The pod columns are
-- those of one copy. (Per-code series such as XID counts collapse too: read those from
-- clean.gpu_samples.)
CREATE OR REPLACE VIEW clean.gpu_device_samples AS
SELECT DISTINCT ON (source, host, gpu_uuid, mig_instance, field, ts) * EXCLUDE (_file)
FROM raw.gpu_samples
WHERE value IS NOT NULL AND NOT isnan(value);

CREATE OR REPLACE VIEW clean.serving_samples AS
SELECT DISTINCT ON (source, target, metric, labels, ts) * EXCLUDE (_file)
FROM raw.serving_samples;

-- Ordering every request by write time costs ~3x a plain dedup; only the few ids that
-- occur more than once need it.
CREATE OR REPLACE VIEW clean.requests AS
WITH repeated AS (
    SELECT request_id FROM raw.requests GROUP BY request_id HAVING count(*) > 1
)
SELECT * EXCLUDE (_file)
FROM raw.requests ANTI JOIN repeated USING (request_id)
UNION ALL
(SELECT DISTINCT ON (request_id) * EXCLUDE (_file)
 FROM raw.requests SEMI JOIN repeated USING (request_id)
 ORDER BY request_id, clean.write_order(_file) DESC);

CREATE OR REPLACE VIEW clean.cache_events AS
SELECT DISTINCT ON (event_id) * EXCLUDE (_file)
FROM raw.cache_events
ORDER BY event_id, clean.write_order(_file) DESC;

CREATE OR REPLACE VIEW clean.scrape_health AS
SELECT DISTINCT ON (target, ts) * EXCLUDE (_file)
FROM raw.scrape_health;

CREATE OR REPLACE VIEW clean.rejects AS
SELECT DISTINCT ON (table_name, source, location, reason) * EXCLUDE (_file)
FROM raw.rejects
ORDER BY table_name, source, location, reason, clean.write_order(_file) DESC;
