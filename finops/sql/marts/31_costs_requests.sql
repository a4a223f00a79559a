-- Cost marts, step 2: what each request really cost.
--
-- Which requests ran on a model (the macros of 20_requests.sql, used by every mart and
-- finops.costs):
--   served_by_cache  cache_status 'hit' (the shim's response cache, or an Idempotency-Key
--                    replay: cache_status 'hit' with retry_of set) or 'coalesced' (a
--                    follower answered by an identical in-flight request, or one whose
--                    client left while it waited): no upstream call of its own
--   refused          error_type 'context_length_exceeded' (a context cap refused it) or
--                    any other 4xx but 408 and 499 (refused before the engine scheduled
--                    it, as vLLM's 400 for a prompt over max_model_len): its input_tokens
--                    is the size that was refused, never processed
--   processed        NOT served_by_cache AND NOT refused: its logged input/output tokens
--                    were processed by a model, so they count as input/output tokens in
--                    marts.requests_hourly, marts.tenant_daily and finops.costs. Failed
--                    requests that reached a model (upstream 5xx, timeouts, aborted
--                    streams) stay processed: they used the GPU.
--   worked           processed AND tier IS NOT NULL: it takes a share of its tier-hour.
-- Token work of a worked request on its tier:
--   work_in  = max(input_tokens - cached_input_tokens, 0)   (prefill actually computed;
--              vLLM prefix-cache hits skip prefill, so they do not draw input cost)
--   work_out = output_tokens                                 (decode steps)
-- Per tier-hour (h, t) with cost pool C (C = gpu_cost on the allocation basis, which
-- includes that tier-hour's idle capacity; C = busy_cost on the usage basis):
--   W_in = sum(work_in), W_out = sum(work_out), N = requests doing work
--   f    = prefill_s / (prefill_s + decode_s)        when vLLM reports the prefill/decode
--          histograms for the tier-hour  (split_method 'prefill_decode_time')
--        = W_in / (W_in + R x W_out)                 otherwise (split_method 'token_ratio'),
--          R = finops_output_token_weight (default 4: decode is memory-bound, one token
--          per step, so an output token costs several times an input token; 4 is the
--          input:output ratio of most public API price lists)
--   f is forced to 0 when W_in = 0 and to 1 when W_out = 0 (a pool without tokens to
--   carry it moves to the other side); when W_in = W_out = 0, C is split equally over
--   the N requests (split_method 'per_request').
--   input_cost_i  = C x f x work_in_i / W_in
--   output_cost_i = C x (1 - f) x work_out_i / W_out
--   cost_i        = input_cost_i + output_cost_i
-- So sum(cost_i) over a tier-hour = C exactly: the allocation basis reconciles to the bill.
-- Requests whose tier-hour has no GPU data get NULL cost (stated by finops.costs).
-- One row per request (clean.requests: the latest written wins), only the columns the
-- cost marts use.
CREATE OR REPLACE VIEW marts.request_work AS
SELECT
    request_id, ts, date_trunc('hour', ts) AS hour,
    tenant, feature, coalesce(operation, 'chat') AS operation, tier,
    coalesce(  -- a failed request's model: its tier's (marts.tier_models, 20_requests.sql)
        response_model, (SELECT m.model FROM marts.tier_models m WHERE m.tier = q.tier), request_model
    ) AS model,
    coalesce(stream, false) AS stream, status_code, error_type, finish_reason,
    retry_of, attempt, cache_status, prompt_fingerprint,
    coalesce(input_tokens, 0) AS input_tokens,
    coalesce(output_tokens, 0) AS output_tokens,
    coalesce(cached_input_tokens, 0) AS cached_input_tokens,
    -- served_by_cache / refused / processed / worked: see the top of this file.
    marts.served_by_cache(cache_status) AS served_by_cache,
    marts.refused(error_type, status_code) AS refused,
    marts.processed(cache_status, error_type, status_code) AS processed,  -- macros: 20_requests.sql
    (tier IS NOT NULL AND processed) AS worked,
    CASE WHEN worked  -- the alias above (DuckDB reuses select-list aliases)
         THEN greatest(coalesce(input_tokens, 0) - coalesce(cached_input_tokens, 0), 0)
         ELSE 0 END AS work_in,
    CASE WHEN worked THEN coalesce(output_tokens, 0) ELSE 0 END AS work_out
FROM clean.requests AS q;

-- Per tier-hour pools and the marginal (average) price of one token of work.
CREATE OR REPLACE VIEW marts.tier_token_prices AS
WITH agg AS (
    SELECT hour, tier,
           count(*) FILTER (worked) AS n_work,
           CAST(sum(work_in) AS BIGINT) AS w_in, CAST(sum(work_out) AS BIGINT) AS w_out
    FROM marts.request_work
    WHERE tier IS NOT NULL
    GROUP BY ALL
),
j AS (
    SELECT a.*, t.gpu_cost, t.busy_cost, t.gpus, p.prefill_s, p.decode_s,
           coalesce(CAST(getvariable('finops_output_token_weight') AS DOUBLE), 4.0::DOUBLE) AS r
    FROM agg a
    LEFT JOIN marts.tier_cost_hourly t USING (hour, tier)
    LEFT JOIN marts.tier_phase_hourly p USING (hour, tier)
),
f AS (
    SELECT *,
        CASE WHEN w_in = 0 AND w_out = 0 THEN 'per_request'
             WHEN coalesce(prefill_s, 0) + coalesce(decode_s, 0) > 0 THEN 'prefill_decode_time'
             ELSE 'token_ratio' END AS split_method,
        CASE WHEN w_in = 0 AND w_out = 0 THEN NULL
             WHEN w_in = 0 THEN 0.0::DOUBLE
             WHEN w_out = 0 THEN 1.0::DOUBLE
             WHEN coalesce(prefill_s, 0) + coalesce(decode_s, 0) > 0
                  THEN coalesce(prefill_s, 0) / (coalesce(prefill_s, 0) + coalesce(decode_s, 0))
             ELSE w_in / (w_in + r * w_out) END AS input_share
    FROM j
)
SELECT
    hour, tier, gpus, n_work, w_in, w_out, prefill_s, decode_s, split_method, input_share,
    gpu_cost AS pool_allocation, busy_cost AS pool_usage,
    gpu_cost * input_share / nullif(w_in, 0) AS usd_per_input_token_allocation,
    gpu_cost * (1 - input_share) / nullif(w_out, 0) AS usd_per_output_token_allocation,
    busy_cost * input_share / nullif(w_in, 0) AS usd_per_input_token_usage,
    busy_cost * (1 - input_share) / nullif(w_out, 0) AS usd_per_output_token_usage
FROM f;

-- Flags that say what a request really was (see finops.costs.leakage):
--   failed          status_code >= 400 or an error_type
--   is_retry        retry_of set or attempt >= 2
--   was_retried     a later request names it in retry_of
--   is_duplicate    processed (not served by the shim's cache: hit or coalesced; not
--                   refused by a cap), and same tenant + prompt_fingerprint as an
--                   earlier request within
--                   finops_duplicate_window_s (default 600 s), not a retry
--   in_storm        failed or retry inside a (tier, 5-minute) window whose retries are
--                   >= max(finops_storm_min_retries (5),
--                          finops_storm_factor (3) x the tier's mean retries per window)
--   stream_aborted  streamed, not failed, produced tokens, finish_reason not a normal end
--   leak            the first of: retried_failure, failed, stream_aborted, duplicate
CREATE OR REPLACE VIEW marts.request_flags AS
WITH base AS (
    SELECT request_id, ts, tier, tenant, prompt_fingerprint, retry_of, attempt,
           status_code, error_type, finish_reason, stream, output_tokens, cache_status,
           processed,
           (coalesce(status_code, 0) >= 400 OR error_type IS NOT NULL) AS failed,
           (retry_of IS NOT NULL OR coalesce(attempt, 1) >= 2) AS is_retry,
           time_bucket(INTERVAL 5 MINUTE, ts) AS bucket
    FROM marts.request_work
),
retried AS (SELECT DISTINCT retry_of AS request_id FROM base WHERE retry_of IS NOT NULL),
dup AS (
    SELECT request_id,
           lag(ts) OVER (PARTITION BY tenant, prompt_fingerprint ORDER BY ts, request_id)
               AS prev_same_ts
    FROM base
    WHERE prompt_fingerprint IS NOT NULL
),
buckets AS (
    SELECT tier, bucket, count(*) FILTER (is_retry) AS retries
    FROM base GROUP BY ALL
),
storms AS (
    SELECT b.tier, b.bucket
    FROM buckets b
    JOIN (SELECT tier, avg(retries) AS mean_retries FROM buckets GROUP BY ALL) m
      ON m.tier IS NOT DISTINCT FROM b.tier
    WHERE b.retries >= greatest(
        coalesce(CAST(getvariable('finops_storm_min_retries') AS DOUBLE), 5.0::DOUBLE),
        coalesce(CAST(getvariable('finops_storm_factor') AS DOUBLE), 3.0::DOUBLE) * m.mean_retries)
),
flags AS (
    SELECT
        b.request_id, b.failed, b.is_retry,
        (r.request_id IS NOT NULL) AS was_retried,
        (NOT b.is_retry AND b.processed AND d.prev_same_ts IS NOT NULL
         AND epoch(b.ts - d.prev_same_ts)
             <= coalesce(CAST(getvariable('finops_duplicate_window_s') AS DOUBLE), 600.0::DOUBLE))
            AS is_duplicate,
        ((b.failed OR b.is_retry) AND s.bucket IS NOT NULL) AS in_storm,
        -- a normal end: chat/completions finish reasons, and the Responses API's (the
        -- shim logs its status, `completed`, or why it is incomplete)
        (b.stream AND NOT b.failed AND b.output_tokens > 0
         AND coalesce(b.finish_reason, '') NOT IN ('stop', 'length', 'tool_calls',
                                                    'content_filter', 'function_call',
                                                    'completed', 'max_output_tokens'))
            AS stream_aborted
    FROM base b
    LEFT JOIN retried r ON r.request_id = b.request_id
    LEFT JOIN dup d ON d.request_id = b.request_id
    LEFT JOIN storms s ON s.tier IS NOT DISTINCT FROM b.tier AND s.bucket = b.bucket
)
SELECT *,
    CASE WHEN failed AND was_retried THEN 'retried_failure'
         WHEN failed THEN 'failed'
         WHEN stream_aborted THEN 'stream_aborted'
         WHEN is_duplicate THEN 'duplicate'
    END AS leak
FROM flags;

-- One row per request with its cost on both bases (formulas at the top of this file).
CREATE OR REPLACE VIEW marts.request_costs AS
WITH c AS (
SELECT
    w.request_id, w.ts, w.hour, w.tenant, w.feature, w.operation, w.tier, w.model,
    w.stream, w.status_code, w.cache_status, w.served_by_cache, w.refused, w.processed,
    w.worked,
    w.input_tokens, w.output_tokens, w.cached_input_tokens, w.work_in, w.work_out,
    p.split_method, p.input_share,
    f.failed, f.is_retry, f.was_retried, f.is_duplicate, f.in_storm, f.stream_aborted, f.leak,
    CASE WHEN w.processed AND w.tier IS NULL THEN NULL  -- ran on GPUs nobody named
         WHEN NOT w.worked THEN 0.0::DOUBLE
         WHEN p.split_method = 'per_request' THEN p.pool_allocation / p.n_work
         ELSE p.pool_allocation * p.input_share * coalesce(w.work_in / nullif(p.w_in, 0), 0.0::DOUBLE)
    END AS input_cost_allocation,
    CASE WHEN w.processed AND w.tier IS NULL THEN NULL  -- ran on GPUs nobody named
         WHEN NOT w.worked THEN 0.0::DOUBLE
         WHEN p.split_method = 'per_request' THEN p.pool_allocation * 0.0::DOUBLE
         ELSE p.pool_allocation * (1 - p.input_share)
              * coalesce(w.work_out / nullif(p.w_out, 0), 0.0::DOUBLE)
    END AS output_cost_allocation,
    CASE WHEN w.processed AND w.tier IS NULL THEN NULL  -- ran on GPUs nobody named
         WHEN NOT w.worked THEN 0.0::DOUBLE
         WHEN p.split_method = 'per_request' THEN p.pool_usage / p.n_work
         ELSE p.pool_usage * p.input_share * coalesce(w.work_in / nullif(p.w_in, 0), 0.0::DOUBLE)
    END AS input_cost_usage,
    CASE WHEN w.processed AND w.tier IS NULL THEN NULL  -- ran on GPUs nobody named
         WHEN NOT w.worked THEN 0.0::DOUBLE
         WHEN p.split_method = 'per_request' THEN p.pool_usage * 0.0::DOUBLE
         ELSE p.pool_usage * (1 - p.input_share) * coalesce(w.work_out / nullif(p.w_out, 0), 0.0::DOUBLE)
    END AS output_cost_usage,
    -- the request's share of its tier-hour's pool (the same on both bases); the shares
    -- of a tier-hour's worked requests sum to 1
    CASE WHEN w.processed AND w.tier IS NULL THEN NULL  -- ran on GPUs nobody named
         WHEN NOT w.worked THEN 0.0::DOUBLE
         WHEN p.split_method = 'per_request' THEN 1.0::DOUBLE / p.n_work
         ELSE p.input_share * coalesce(w.work_in / nullif(p.w_in, 0), 0.0::DOUBLE)
              + (1 - p.input_share) * coalesce(w.work_out / nullif(p.w_out, 0), 0.0::DOUBLE)
    END AS pool_share,
    -- its tier-hour has no GPU cost (no GPU data or no price), whether or not it did work,
    -- or it did work with no tier logged (a mapped gateway log without one: which GPUs
    -- served it is unknown): per-request and per-token figures leave these out of their
    -- denominators, or they would dilute a priced tier's cost per request as $0
    ((w.tier IS NOT NULL AND p.pool_allocation IS NULL) OR (w.tier IS NULL AND w.processed))
        AS unpriced_tier_hour,
    (w.processed AND unpriced_tier_hour) AS unpriced
FROM marts.request_work w
LEFT JOIN marts.tier_token_prices p ON p.hour = w.hour AND p.tier = w.tier
LEFT JOIN marts.request_flags f ON f.request_id = w.request_id
)
SELECT *,
    input_cost_allocation + output_cost_allocation AS cost_allocation,
    input_cost_usage + output_cost_usage AS cost_usage
FROM c;
