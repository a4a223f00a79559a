"""Serving models fitted on the lake, and what they say about growth.

- `finops.models.throughput`: tokens/s and SM activity vs load per tier
  (`fit_throughput`, `fit_all`), a saturating curve with held-out-day MAPE;
- `finops.models.latency`: TTFT / inter-token latency quantiles vs load from
  vLLM's histograms (`fit_latency`, `histogram_quantiles`);
- `finops.models.queueing`: the continuous-batching discrete-event simulation
  and Erlang C;
- `finops.models.simulate`: capacity and growth plans with the cost levers
  (`Simulator`, `Levers`, `headline`);
- `finops.models.waterfall`: where a plan's saving comes from, the levers applied one at
  a time in a fixed order (`lever_waterfall`, `describe_levers`);
- `finops.models.autoscaling`: queue-depth targets as KEDA / HPA YAML;
- `finops.models.charts`: Altair charts for all of the above.

>>> from finops.models.simulate import headline
>>> print(headline(finops.connect(), 5)["line"])
>>> from finops.models.waterfall import lever_waterfall
>>> lever_waterfall(Simulator.from_lake(finops.connect()), 5)
"""
