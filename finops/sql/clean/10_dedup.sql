-- Clean layer, step 1: one row per deterministic key.
-- Loading the same scrape or log twice leaves duplicates in raw; these views
-- keep the first, so every mart above sees each sample/request once.
CREATE OR REPLACE VIEW clean.gpu_samples AS
SELECT DISTINCT ON (source, host, gpu_uuid, mig_instance, field, ts) *
FROM raw.gpu_samples
WHERE value IS NOT NULL AND NOT isnan(value);

CREATE OR REPLACE VIEW clean.serving_samples AS
SELECT DISTINCT ON (source, target, metric, labels, ts) *
FROM raw.serving_samples;

CREATE OR REPLACE VIEW clean.requests AS
SELECT DISTINCT ON (request_id) *
FROM raw.requests;

CREATE OR REPLACE VIEW clean.cache_events AS
SELECT DISTINCT ON (event_id) *
FROM raw.cache_events;

CREATE OR REPLACE VIEW clean.scrape_health AS
SELECT DISTINCT ON (target, ts) *
FROM raw.scrape_health;

CREATE OR REPLACE VIEW clean.rejects AS
SELECT DISTINCT ON (table_name, source, location, reason) *
FROM raw.rejects;
