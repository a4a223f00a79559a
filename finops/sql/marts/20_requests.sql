-- Token columns count only tokens a model processed: a request served by the shim's
-- response cache (cache_status 'hit', Idempotency-Key replays included) or coalesced onto
-- an identical in-flight request (cache_status 'coalesced') made no upstream call, and a
-- refused request never reached the engine: a context cap's refusal (error_type
-- 'context_length_exceeded') or any other 4xx answer (vLLM validates a request, its
-- length against max_model_len included, before scheduling it, and answers a plain 400
-- 'BadRequestError'; 401/404/413/422/429 are refused before any model call). Such a
-- request logs the refused size as input_tokens, but nothing ran. Their tokens are not
-- counted; the requests are (requests, failed, retries, cache_hits). 499 (the client left)
-- and 408 (a timeout) may have run part of the way, and every 5xx, timeout and aborted
-- stream that reached a model counts: they used the GPU.
-- The rule is these macros, used here, by 31_costs_requests.sql and finops.costs.
CREATE OR REPLACE MACRO marts.served_by_cache(cache_status) AS
    lower(coalesce(cache_status, '')) IN ('hit', 'coalesced');
CREATE OR REPLACE MACRO marts.refused(error_type, status_code) AS
    coalesce(error_type, '') = 'context_length_exceeded'
    OR (coalesce(status_code, 0) BETWEEN 400 AND 498 AND status_code <> 408);
CREATE OR REPLACE MACRO marts.processed(cache_status, error_type, status_code) AS
    NOT marts.served_by_cache(cache_status)
    AND NOT marts.refused(error_type, status_code);

-- The model each tier served most often. A request that failed before a model answered
-- (a 5xx, a timeout, a refusal) logs no response model: its `model` below is its tier's
-- (read here), so `--by model` lists it beside that model's other requests, not under the
-- name it asked for ('auto', a tier alias) as a model of its own; one with no tier
-- (refused before routing) keeps the name it asked for.
-- The most frequent model per tier; a tie goes to the alphabetically first model name
-- (mode() picked by scan order, so the name could change between runs of the same lake).
CREATE OR REPLACE VIEW marts.tier_models AS
SELECT tier, response_model AS model
FROM raw.requests
WHERE tier IS NOT NULL AND response_model IS NOT NULL
GROUP BY tier, response_model
QUALIFY row_number() OVER (PARTITION BY tier ORDER BY count(*) DESC, response_model) = 1;

-- Mart: requests per hour by tier/tenant/feature/model, with latency percentiles.
CREATE OR REPLACE VIEW marts.requests_hourly AS
WITH r AS (
    SELECT *, marts.processed(cache_status, error_type, status_code) AS processed FROM clean.requests
)
SELECT
    date_trunc('hour', ts) AS hour,
    tier, tenant, feature,
    coalesce(
        response_model, (SELECT m.model FROM marts.tier_models m WHERE m.tier = r.tier), request_model
    ) AS model,
    count(*) AS requests,
    count(*) FILTER (status_code >= 400 OR error_type IS NOT NULL) AS failed,
    count(*) FILTER (retry_of IS NOT NULL) AS retries,
    -- the lake stores cache_status lower-cased (finops.schemas); lower() also reads lakes
    -- written before it did, as served_by_cache does
    count(*) FILTER (lower(cache_status) = 'hit') AS cache_hits,
    sum(input_tokens) FILTER (processed) AS input_tokens,
    sum(output_tokens) FILTER (processed) AS output_tokens,
    sum(cached_input_tokens) FILTER (processed) AS cached_input_tokens,
    quantile_cont(ttft_ms, 0.5) AS ttft_p50_ms,
    quantile_cont(ttft_ms, 0.95) AS ttft_p95_ms,
    quantile_cont(latency_ms, 0.5) AS latency_p50_ms,
    quantile_cont(latency_ms, 0.95) AS latency_p95_ms
FROM r
GROUP BY ALL;

-- Mart: one row per tenant per day (token columns: processed requests only, as above).
CREATE OR REPLACE VIEW marts.tenant_daily AS
WITH r AS (
    SELECT *, marts.processed(cache_status, error_type, status_code) AS processed FROM clean.requests
)
SELECT
    CAST(ts AS DATE) AS date,
    tenant,
    count(*) AS requests,
    count(*) FILTER (status_code >= 400 OR error_type IS NOT NULL) AS failed,
    count(*) FILTER (retry_of IS NOT NULL) AS retries,
    sum(input_tokens) FILTER (processed) AS input_tokens,
    sum(output_tokens) FILTER (processed) AS output_tokens,
    sum(cached_input_tokens) FILTER (processed) AS cached_input_tokens,
    count(DISTINCT feature) AS features
FROM r
GROUP BY ALL;
