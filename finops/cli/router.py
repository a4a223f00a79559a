"""`finops router ...`: make demo data, train, evaluate, export, inspect and verify routers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from finops.cli._common import LakeOption, fail, resolve_lake

if TYPE_CHECKING:
    from finops.router.data import LabeledData

router_app = typer.Typer(
    help="Train a request classifier and ship it as a verified artifact.", no_args_is_help=True
)


def _parse_upstream(items: list[str] | None, tiers: list[str]) -> dict[str, str]:
    """TIER=MODEL pairs; a tier not among `tiers` (a typo) is refused, not ignored."""
    out = {}
    for it in items or []:
        tier, sep, model = it.partition("=")
        if not sep or not tier.strip() or not model.strip():
            fail(f"--upstream: expected TIER=MODEL, got {it!r}")
        if tier.strip() not in tiers:
            fail(f"--upstream {it!r}: unknown tier {tier.strip()!r}; the tiers are {tiers}")
        out[tier.strip()] = model.strip()
    return out


def _check_format(format: str) -> None:
    if format not in ("table", "json"):
        fail(f"--format must be table or json, got {format!r}")


def _report_bad_rows(ds: LabeledData) -> list[str]:
    """Print a labeled set's skipped rows (first 10, then a count) to stderr; return all.

    Nothing is skipped silently: `train` and `evaluate` name the same rows the same way.
    """
    bad = [str(b) for b in ds.bad_rows]
    for b in bad[:10]:
        typer.echo(f"skipped {b}", err=True)
    if bad:
        typer.echo(
            f"{len(bad)} bad row(s) skipped of {ds.read} read; {ds.frame.height} loaded", err=True
        )
    return bad


def _training_overlap(router: Any, data: Path, sha256: str, lake: Path | None) -> str | None:
    """Why `data` is the artifact's own training data, or None when its hash says it is not.

    Compared with the manifest's `training_data.sha256`: the file's own sha256, or, for an
    artifact trained on a lake + labels file, the same combination `load_lake` hashes
    (the labels file with the recorded lake, or with --lake).
    """
    from finops.router.data import lake_labels_sha256

    td = router.manifest["training_data"]
    want = td.get("sha256")
    if not isinstance(want, str) or not want:
        return None
    if sha256 == want:
        return f"{data} is this artifact's training data (its sha256 equals training_data.sha256)"
    source = td.get("source")
    if not (isinstance(source, str) and source.startswith("lake ")):
        return None
    parts = source.removeprefix("lake ").split(" + ")  # "lake {lake} + {labels}"
    lakes = [Path(" + ".join(parts[:i])) for i in range(1, len(parts))]
    for lk in [*lakes, *([lake] if lake is not None else [])]:
        if not (lk / "requests").is_dir():
            continue
        if lake_labels_sha256(sha256, lk) == want:
            return (
                f"{data} with lake {lk} is this artifact's training data (their combined "
                f"sha256 equals training_data.sha256, source {source!r})"
            )
    return None


def _drop_training_rows(
    ds: LabeledData, trained: Any, data: Path
) -> tuple[LabeledData, int, str | None]:
    """(the rows the artifact never saw, how many were left out, why all of them are its
    own or None).

    Rows are matched by `data.row_hash` against the artifact's training-rows file, so a
    file that mixes training rows with new ones is scored on the new ones only. When every
    row was a training row there is nothing held out: the set is kept whole, and the
    caller warns as it does for the training file itself.
    """
    import numpy as np

    seen = np.isin(ds.frame["row_hash"].to_numpy(), trained)
    n = int(seen.sum())
    if n == 0:
        return ds, 0, None
    if n == ds.frame.height:
        return (
            ds,
            0,
            (
                f"all {n} rows of {data} were in this artifact's training set (fitted on or "
                "calibrated with; matched by request_id, else prompt text)"
            ),
        )
    return ds.take(np.flatnonzero(~seen)), n, None


def _overlap_warning(reason: str, training_data: dict[str, Any]) -> str:
    """The stderr line for `evaluate` on the training data: which rows were not held out."""
    sp = training_data.get("splits")
    counts = ""
    if isinstance(sp, dict) and all(isinstance(sp.get(k), int) for k in ("train", "test")):
        counts = (
            f" ({sp['train']} rows were fitted on and {sp.get('calibration', '?')} calibrated "
            f"the thresholds; only {sp['test']} were held out)"
        )
    return (
        f"warning: {reason}{counts}: these rows include the training rows, so accuracy, "
        "APGR, savings and quality retained are optimistic, not held-out figures; evaluate "
        "on labeled requests the artifact never saw"
    )


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"


def _json(obj: object) -> str:
    return json.dumps(obj, indent=2, default=str)


@router_app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option("--out", help="File to write (.jsonl, .csv or .parquet).")],
    n: Annotated[int, typer.Option("--n", help="Rows.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same file).")] = 0,
    scores: Annotated[bool, typer.Option(help="Per-tier judge scores instead of labels.")] = False,
) -> None:
    """Write the demo labeled set: realistic prompt families, noisy labels, 55/30/15 shares."""
    from finops.router.data import DataError, file_format, write_demo_labeled

    if n < 1:
        fail("--n must be >= 1")
    try:
        file_format(out)  # before generating: only formats `train` reads
        path = write_demo_labeled(out, n, seed, scores=scores)
    except DataError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"--out {out}: cannot write: {exc.strerror or exc}")
    typer.echo(f"wrote {n} labeled requests to {path}")


@router_app.command("train")
def train_cmd(
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Labeled set (JSONL/CSV/Parquet); with --labels, the lake folder whose "
            "requests the labels name.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="New artifact directory.")],
    tiers: Annotated[
        str, typer.Option(help="Tiers, cheapest first (3 or more).")
    ] = "small,mid,large",
    quality_target: Annotated[
        float,
        typer.Option(
            help="1 - the max mean quality loss vs all-large (absolute, 0-1 score units; "
            "the share of quality kept when the large tier always succeeds, as with plain labels)."
        ),
    ] = 0.98,
    confidence: Annotated[float, typer.Option(help="Confidence of the guarantee.")] = 0.95,
    upstream: Annotated[
        list[str] | None, typer.Option(help="TIER=MODEL upstream model name (repeatable).")
    ] = None,
    text: Annotated[str, typer.Option(help="Use prompt text: auto|on|off.")] = "auto",
    lake: Annotated[
        Path | None, typer.Option(help="Lake whose cost marts price the tiers (optional).")
    ] = None,
    labels: Annotated[
        Path | None, typer.Option(help="With --data lake: labels file keyed by request_id.")
    ] = None,
    quality_bar: Annotated[float, typer.Option(help="Score that counts as good enough.")] = 0.7,
    cv_folds: Annotated[int, typer.Option(help="Cross-validation folds for the report.")] = 3,
    seed: Annotated[int, typer.Option()] = 0,
    force: Annotated[bool, typer.Option(help="Replace an existing artifact at --out.")] = False,
) -> None:
    """Fit, calibrate thresholds to the quality target, evaluate on held-out rows, export."""
    from finops.router.artifact import ArtifactError
    from finops.router.data import DataError, load_labeled, load_lake, parse_tiers
    from finops.router.train import one_line, train

    try:
        tier_list = parse_tiers(tiers)
    except DataError as exc:
        fail(str(exc))
    up = _parse_upstream(upstream, tier_list)  # options first: no minutes lost to a typo
    if not 0.0 <= quality_bar <= 1.0:  # a score in [0, 1] counts as good enough at the bar
        fail(f"--quality-bar must be in [0, 1], got {quality_bar}")
    try:
        if labels is not None:
            ds = load_lake(data, labels, tiers=tier_list, quality_bar=quality_bar)
        else:
            ds = load_labeled(data, tiers=tier_list, quality_bar=quality_bar)
    except DataError as exc:
        fail(str(exc))
    _report_bad_rows(ds)
    for note in ds.notes:
        typer.echo(f"note: {note}", err=True)
    try:
        res = train(
            ds,
            out,
            upstream=up,
            quality_target=quality_target,
            confidence=confidence,
            text=text,
            seed=seed,
            cv_folds=cv_folds,
            lake=lake,
            overwrite=force,
        )
    except (DataError, ArtifactError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"--out {out}: cannot write: {exc.strerror or exc}")
    assert res.router is not None
    for note in res.evaluation.get("notes", []):
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"artifact {res.path} version {res.router.version}")
    typer.echo(f"decision: {res.decision['guarantee']}; lambda={res.decision['lambda']}")
    typer.echo(f"prices: {res.evaluation['prices']['source']}")
    typer.echo(one_line(res.evaluation, ds.tiers))


@router_app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Artifact directory (replaced).")] = Path(
        "data/router/demo-artifact"
    ),
    n: Annotated[int, typer.Option("--n", help="Demo labeled rows.")] = 8000,
    lake: Annotated[
        Path | None, typer.Option(help="Lake to price tiers and replay (default: the project's).")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Demo: train a router on the demo labeled set, print its one-line evaluation and $."""
    from finops.cli._common import resolve_lake
    from finops.router.artifact import ArtifactError, check_out_dir
    from finops.router.data import DataError, load_labeled, write_demo_labeled
    from finops.router.evaluate import replay_lake
    from finops.router.train import one_line, train

    if n < 1:
        fail("--n must be >= 1")
    lake_path = resolve_lake(lake)
    has_lake = (lake_path / "requests").is_dir()
    try:
        # --out first: nothing is written next to a --out that would be refused
        check_out_dir(out, overwrite=True)
        data = write_demo_labeled(out.parent / "demo-labeled.jsonl", n, seed)
        res = train(
            load_labeled(data),
            out,
            cv_folds=0,
            seed=seed,
            lake=lake_path if has_lake else None,
            overwrite=True,
        )
        assert res.router is not None
        typer.echo(f"router {res.router.version} -> {out}")
        typer.echo(one_line(res.evaluation, res.router.tiers))
        if not has_lake:
            return
        import finops

        captured = (
            finops.connect(lake_path)
            .sql("SELECT count(prompt_text) FROM clean.requests")
            .fetchall()[0][0]
        )
        replay_router = res.router
        if not captured:
            # capture is off in this lake: replay with a metadata-only router, as production would
            meta = train(
                load_labeled(data),
                out.with_name(f"{out.name}-metadata"),
                cv_folds=0,
                seed=seed,
                text="off",
                lake=lake_path,
                overwrite=True,
            )
            assert meta.router is not None
            replay_router = meta.router
            typer.echo(
                f"lake has no captured prompt text: metadata-only router "
                f"{meta.router.version} -> {meta.path}"
            )
            typer.echo(one_line(meta.evaluation, meta.router.tiers))
        typer.echo(replay_lake(replay_router, lake_path)["line"])
    except (DataError, ArtifactError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"--out {out}: cannot write: {exc.strerror or exc}")


@router_app.command("evaluate")
def evaluate_cmd(
    artifact: Annotated[Path, typer.Option("--artifact", help="Artifact directory.")],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Labeled set (JSONL/CSV/Parquet); with --labels, the lake folder whose "
            "requests the labels name.",
        ),
    ] = None,
    labels: Annotated[
        Path | None, typer.Option(help="With --data lake: labels file keyed by request_id.")
    ] = None,
    lake: Annotated[
        Path | None, typer.Option("--lake", help="Replay this lake's last week for dollars.")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="table|json")] = "table",
    quality_bar: Annotated[
        float | None,
        typer.Option(
            "--quality-bar",
            help="Score that counts as good enough for --data scores "
            "(default: the bar the artifact was trained with).",
        ),
    ] = None,
) -> None:
    """Accuracy, AUC per tier, CPT(50/80), APGR, shares, quality retained, $ vs all-large;
    with --lake, the replay's $ vs the routing the log shows first, then vs all-large.

    Shares, quality retained and dollars are those of the served decision rule (each
    tier's own threshold, as `route()` and the shim decide).
    """
    from finops.router import evaluate as E
    from finops.router.artifact import ArtifactError, load_router
    from finops.router.data import DEFAULT_QUALITY_BAR, DataError, load_labeled, load_lake
    from finops.router.train import evaluate_split, one_line

    _check_format(format)
    if data is None and lake is None:
        fail("give --data (labeled set) and/or --lake (traffic to replay)")
    if labels is not None and data is None:
        fail("--labels needs --data LAKE: the lake folder whose requests the labels name")
    try:
        router = load_router(artifact)
    except ArtifactError as exc:
        fail(str(exc))
    if quality_bar is not None and not 0.0 <= quality_bar <= 1.0:
        fail(f"--quality-bar must be in [0, 1], got {quality_bar}")
    result: dict = {"artifact": str(artifact), "version": router.version}
    if data is not None:
        trained_bar = router.manifest["training_data"].get("quality_bar")
        if quality_bar is not None:
            bar, bar_source = quality_bar, "--quality-bar"
        elif isinstance(trained_bar, int | float) and not isinstance(trained_bar, bool):
            bar, bar_source = float(trained_bar), "the artifact's training data"
        else:
            bar, bar_source = DEFAULT_QUALITY_BAR, "default (the artifact records none)"
        try:
            if labels is not None:
                ds = load_lake(data, labels, tiers=router.tiers, quality_bar=bar)
            else:
                ds = load_labeled(data, tiers=router.tiers, quality_bar=bar)
            trained_rows = router.training_row_hashes()
        except (DataError, ArtifactError) as exc:
            fail(str(exc))
        skipped = _report_bad_rows(ds)
        loaded = ds.frame.height
        excluded = 0
        if trained_rows is None:  # an artifact from before row fingerprints: the file hash
            overlap = _training_overlap(router, data, ds.sha256, lake)
        else:
            ds, excluded, overlap = _drop_training_rows(ds, trained_rows, data)
        if overlap is not None:
            typer.echo(_overlap_warning(overlap, router.manifest["training_data"]), err=True)
        elif excluded:
            typer.echo(
                f"note: {excluded} of {loaded} rows of {data} were in the artifact's "
                f"training set (fitted on or calibrated with); evaluating on the other "
                f"{ds.frame.height}, which it never saw",
                err=True,
            )
        rows = ds.features(router.uses_prompt_text).to_dicts()
        proba = router.probabilities_for_rows(rows)
        ev = evaluate_split(proba, ds, router.thresholds[0], lake=lake)
        # the served policy: each tier's own threshold, decided as route() decides
        out_tok = ds.frame["output_tokens"].fill_null(0.0).to_numpy()
        cost = E.cost_matrix(
            ds.frame["input_tokens"].to_numpy(), out_tok, ev["prices"], router.tiers
        )
        idx = E.served_indices(router, rows)
        ev["at_threshold"] = E.at_served(router, idx, ds.quality, cost)
        ev["quality_bar"] = {"value": bar, "source": bar_source}
        ev["bad_rows"] = len(skipped)
        ev["skipped_rows"] = skipped  # `file:line: field ...`, as printed
        ev["includes_training_rows"] = overlap is not None
        ev["training_overlap"] = overlap
        ev["training_rows_excluded"] = excluded
        ev["rows_loaded"] = loaded
        result["evaluation"] = ev
        shown = dict(ev, at_threshold=dict(ev["at_threshold"]))
        if shown["at_threshold"]["lambda"] is None:  # per-tier thresholds: say which
            label = E.thresholds_label(router).removeprefix("thresholds ")
            shown["at_threshold"]["lambda"] = f"per tier ({label})"
        result["line"] = one_line(shown, router.tiers, held_out=overlap is None)
    if lake is not None:
        if not lake.exists():
            fail(f"{lake}: no lake here")
        result["replay"] = E.replay_lake(router, lake)
    if format == "json":
        typer.echo(_json(result))
        return
    if "evaluation" in result:
        ev = result["evaluation"]
        m, at = ev["routellm"], ev["at_threshold"]
        left_out = (
            f"; training rows left out: {ev['training_rows_excluded']}"
            if ev["training_rows_excluded"]
            else ""
        )
        typer.echo(f"rows {ev['rows']} (bad rows skipped: {ev['bad_rows']}{left_out})")
        qb = ev["quality_bar"]
        typer.echo(f"quality bar {qb['value']:g} (from {qb['source']})")
        typer.echo(f"accuracy {ev['accuracy']:.3f}  log loss {ev['log_loss']:.3f}")
        typer.echo(
            "AUC per tier: " + ", ".join(f"{t} {v:.3f}" for t, v in ev["auc_per_tier"].items())
        )
        typer.echo(
            f"APGR {_f(m['apgr'])}  AUC {m['auc']:.3f}  CPT50 {_f(m['cpt50'])}  CPT80 {_f(m['cpt80'])}"
        )
        for name, b in ev["baselines"].items():
            typer.echo(
                f"  baseline {name:<12} APGR {_f(b['apgr'])}  CPT50 {_f(b['cpt50'])}  CPT80 {_f(b['cpt80'])}"
            )
        typer.echo(
            f"served decision ({E.thresholds_label(router)}) shares: "
            + ", ".join(f"{t} {s:.1%}" for t, s in at["shares"].items())
        )
        typer.echo(f"quality retained {_pct(at['quality_retained'])}")
        for note in ev.get("notes", []):
            typer.echo(f"note: {note}")
        typer.echo(f"prices: {ev['prices']['source']}")
        typer.echo(result["line"])
    if "replay" in result:
        typer.echo(result["replay"]["line"])
        for line in _replay_costs(result["replay"]):
            typer.echo(line)


def _replay_costs(rep: dict[str, Any]) -> list[str]:
    """The lake replay's routings side by side (`replay_routings`), and what was left out."""
    from finops.router.evaluate import replay_routings, usd

    out = []
    for r in replay_routings(rep):
        shares = " ".join(f"{t} {v:.0%}" for t, v in (r["shares"] or {}).items())
        out.append(f"replay, {r['requests']}: {r['routing']} {usd(r['cost_usd'])} ({shares})")
    why = [f"{rep['no_logged_tier']:,} with no logged tier"] if rep.get("no_logged_tier") else []
    why += [f"{k:,} logged on tier {t!r}" for t, k in (rep.get("other_tier") or {}).items()]
    if why:
        left = rep.get("no_logged_tier", 0) + sum((rep.get("other_tier") or {}).values())
        out.append(
            f"replay: {left:,} requests left out of the logged comparison ({', '.join(why)})"
        )
    if out:
        out.append(f"replay quality: {rep.get('quality_note', 'n/a')}")
    return out


@router_app.command("offpolicy")
def offpolicy_cmd(
    artifact: Annotated[Path, typer.Argument(help="Candidate router artifact directory.")],
    lake: LakeOption = None,
    since: Annotated[
        str | None, typer.Option("--from", help="First day (YYYY-MM-DD, inclusive).")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--to", help="Last day (YYYY-MM-DD, inclusive).")
    ] = None,
    exploration_rate: Annotated[
        float, typer.Option(help="The candidate's own exploration rate (0: deterministic).")
    ] = 0.0,
    confidence: Annotated[float, typer.Option(help="Confidence of the intervals.")] = 0.95,
    format: Annotated[str, typer.Option("--format", help="table|json")] = "table",
) -> None:
    """Estimate a candidate router's cost, tokens, errors and latency from the shim's logs.

    Inverse propensity scoring (IPS and self-normalized SNIPS) over logged routed requests,
    weighting each request whose logged `routed_tier` the candidate would also pick by
    1 / route_propensity; with the logging routers' observed means, the match count, the
    effective sample size and confidence intervals.
    """
    import warnings

    from finops.costs import CostError
    from finops.router.artifact import ArtifactError, load_router
    from finops.router.offpolicy import OffPolicyError, format_table, off_policy_estimate

    _check_format(format)
    if not 0.0 <= exploration_rate < 1.0:
        fail(f"--exploration-rate must be in [0, 1), got {exploration_rate}")
    if not 0.0 < confidence < 1.0:
        fail(f"--confidence must be in (0, 1), got {confidence}")
    try:
        router = load_router(artifact)
    except ArtifactError as exc:
        fail(str(exc))
    lake_path = resolve_lake(lake)
    try:
        with warnings.catch_warnings():  # printed from the result's own list
            warnings.simplefilter("ignore")
            res = off_policy_estimate(
                router,
                lake_path,
                since=since,
                until=until,
                exploration_rate=exploration_rate,
                confidence=confidence,
            )
    except (OffPolicyError, CostError) as exc:
        fail(str(exc))
    if format == "json":
        typer.echo(_json(res))
    else:
        for line in format_table(res):
            typer.echo(line)
        typer.echo(res["line"])
        return
    for w in res["warnings"]:
        typer.echo(f"warning: {w}", err=True)


@router_app.command("export")
def export_cmd(
    src: Annotated[Path, typer.Argument(help="Artifact (or training run) directory.")],
    dst: Annotated[Path, typer.Argument(help="New directory to write.")],
) -> None:
    """Verify an artifact and copy exactly its listed files to a new directory."""
    from finops.router.artifact import ArtifactError, copy_verified

    try:
        router = copy_verified(src, dst)
    except ArtifactError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{dst}: cannot write: {exc.strerror or exc}")
    typer.echo(f"exported {router.version} to {dst} (verified)")


@router_app.command("inspect")
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="Artifact directory.")],
    format: Annotated[str, typer.Option("--format", help="table|json")] = "table",
) -> None:
    """Show an artifact's manifest (it is verified first)."""
    from finops.router.artifact import ArtifactError, load_router

    _check_format(format)
    try:
        router = load_router(path)
    except ArtifactError as exc:
        fail(str(exc))
    m = router.manifest
    if format == "json":
        typer.echo(_json(m))
        return
    td = m["training_data"]
    at = m["evaluation"].get("at_threshold", {})
    typer.echo(f"version      {m['version']}  (format {m['format']} v{m['format_version']})")
    typer.echo("tiers        " + ", ".join(f"{t} -> {m['upstream_models'][t]}" for t in m["tiers"]))
    typer.echo(f"decision     {m['decision']['rule']}; lambda={m['decision']['lambda']}")
    typer.echo(f"guarantee    {m['decision']['guarantee']}")
    typer.echo(f"features     {[c['name'] for c in m['feature_schema']]}")
    typer.echo(f"prompt text  {'used' if m['uses_prompt_text'] else 'not used (metadata only)'}")
    typer.echo(
        f"training     {td.get('rows_loaded')} rows ({td.get('rows_bad')} bad) sha256 "
        f"{str(td.get('sha256'))[:16]}… from {td.get('source')}"
    )
    if at:
        typer.echo(
            f"test         quality retained {_pct(at.get('quality_retained'))}, saved "
            f"{at['saved_pct']:.1%} vs all-large, shares {at['shares']}"
        )
    typer.echo(f"libraries    {m['libraries']}")
    typer.echo(f"drift ref    tier shares {m['drift'].get('tier_shares')}")


@router_app.command("verify")
def verify_cmd(path: Annotated[Path, typer.Argument(help="Artifact directory.")]) -> None:
    """Check hashes, schema, trusted types, library versions and probe predictions.

    Hashes are unkeyed: they catch corruption, swapped files and edits, not a forger
    (artifacts are not signed).
    """
    from finops.router.artifact import ArtifactError, load_router

    try:
        router = load_router(path)
    except ArtifactError as exc:
        fail(str(exc), code=1)
    typer.echo(f"ok {router.version} ({len(router.manifest['files'])} file(s) verified)")


def register(app: typer.Typer) -> None:
    app.add_typer(router_app, name="router")
