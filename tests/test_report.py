"""The report stage on run folders written by the test itself: no database needed."""

from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from report_fixtures import (
    DIRT,
    POST_ERRORS,
    START_TS,
    standard_run,
    synthetic_samples,
    write_run,
)

from harness.cli import main
from harness.errors import ConfigError, SamplesError
from harness.report import (
    ReportSettings,
    Verdict,
    bootstrap_quantile_delta,
    build_report,
    latency_table,
    load_gates,
    outcome_table,
)
from harness.rundir import RUN_FILE, read_json, samples_file


def _report(run_dir: Path, gates: Path | None = None):
    return build_report(ReportSettings(run_dir=run_dir, gates_file=gates, charts=False))


def _strict_json(path: Path):
    def refuse(name: str):
        raise AssertionError(f"{path.name} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


# --------------------------------------------------------------------------
# Figures known by construction


def _known_frame() -> pd.DataFrame:
    """create_booking: latencies 1..1000 ms; place_hold: 10 x 5 ms; 10 s long."""
    create = np.arange(1, 1001, dtype=np.float64)
    hold = np.full(10, 5.0)
    n = create.size + hold.size
    outcome = ["ok"] * n
    for i in range(50):  # 5% of the creates refused by the exclusion constraint
        outcome[i] = "exclusion_violation"
    for i in range(50, 60):  # 1% idempotency replays
        outcome[i] = "unique_violation"
    outcome[1000] = "deadlock_detected"  # one of the ten holds
    return pd.DataFrame(
        {
            "ts": START_TS + np.linspace(0.0, 10.0, n),
            "operation": pd.Categorical(["create_booking"] * 1000 + ["place_hold"] * 10),
            "outcome": pd.Categorical(outcome),
            "sqlstate": pd.array([None] * n, dtype="string"),
            "constraint": pd.Categorical([None] * n),
            "latency_ms": np.concatenate([create, hold]),
        }
    )


def test_percentiles_are_exact_and_match_numpy() -> None:
    frame = _known_frame()
    table = latency_table(frame, duration_s=10.0)
    create = table.loc["create_booking"]
    # linear interpolation over 1..1000: rank (n-1)*q
    assert create["p50_ms"] == pytest.approx(500.5)
    assert create["p95_ms"] == pytest.approx(950.05)
    assert create["p99_ms"] == pytest.approx(990.01)
    assert create["max_ms"] == 1000.0
    assert create["requests"] == 1000
    assert create["throughput_rps"] == pytest.approx(100.0)
    assert table.loc["place_hold", "p95_ms"] == 5.0
    everything = frame["latency_ms"].to_numpy()
    expected = np.quantile(everything, [0.5, 0.95, 0.99])
    assert table.loc["all", ["p50_ms", "p95_ms", "p99_ms"]].tolist() == pytest.approx(expected)
    assert table.loc["all", "requests"] == 1010


def test_outcome_rates_known_by_construction() -> None:
    table = outcome_table(_known_frame(), duration_s=10.0)
    row = table.set_index(["operation", "outcome"])
    assert row.loc[("create_booking", "exclusion_violation"), "count"] == 50
    assert row.loc[("create_booking", "exclusion_violation"), "share"] == pytest.approx(0.05)
    assert row.loc[("create_booking", "exclusion_violation"), "per_s"] == pytest.approx(5.0)
    assert row.loc[("create_booking", "unique_violation"), "share"] == pytest.approx(0.01)
    assert row.loc[("create_booking", "ok"), "count"] == 940
    assert row.loc[("place_hold", "deadlock_detected"), "share"] == pytest.approx(0.1)
    assert row.loc[("all", "ok"), "count"] == 1010 - 61
    # shares of each operation add up to one
    sums = table.groupby("operation")["share"].sum()
    assert sums.tolist() == pytest.approx([1.0] * len(sums))


def test_summary_figures_match_numpy_on_the_files(tmp_path: Path) -> None:
    run_dir = standard_run(tmp_path / "run")
    result = _report(run_dir)
    summary = _strict_json(result.summary_json)
    post = synthetic_samples(4000, phase="post", seed=2, errors=POST_ERRORS)
    creates = post.loc[post["operation"] == "create_booking", "latency_ms"].to_numpy()
    fig = summary["latency"]["post"]["create_booking"]
    assert fig["requests"] == creates.size
    assert fig["p95_ms"] == pytest.approx(np.quantile(creates, 0.95))
    assert fig["p99_ms"] == pytest.approx(np.quantile(creates, 0.99))
    assert fig["max_ms"] == pytest.approx(creates.max())
    refused = int((post["outcome"] == "exclusion_violation").sum())
    rate = summary["outcome_rates"]["post"]["all"]["exclusion_violation"]
    assert rate["count"] == refused
    assert rate["share"] == pytest.approx(refused / 4000)
    # the nightly job's keys
    assert summary["migrations"]["002_x.sql"]["duration_s"] == 1.0
    assert set(summary["comparison"]["p95"]) == {"create_booking", "update_booking", "place_hold"}
    assert summary["verdict"] == "PASS" == str(result.verdict)
    mapping = _strict_json(result.error_mapping_json)
    assert mapping == summary["error_mapping"]


# --------------------------------------------------------------------------
# Gates


def _junit_cases(path: Path) -> dict[str, ET.Element]:
    root = ET.parse(path).getroot()
    return {case.get("name"): case for case in root.iter("testcase")}


def test_healthy_run_passes_every_gate(tmp_path: Path) -> None:
    result = _report(standard_run(tmp_path / "run"))
    assert result.verdict is Verdict.PASS
    assert all(g.status == "pass" for g in result.gates)
    # reviewers other than the user who ran it can open the outputs
    assert result.report_html.stat().st_mode & 0o777 == 0o644
    cases = _junit_cases(result.junit_xml)
    assert set(cases) == {g.name for g in result.gates}
    assert all(case.find("failure") is None for case in cases.values())
    assert "PASS" in result.report_html.read_text()


def test_p95_regression_fails_the_gate_and_junit_says_so(tmp_path: Path) -> None:
    # every post latency three times the pre one: +200%, far beyond noise
    run_dir = standard_run(tmp_path / "run", post_scale=3.0)
    assert main(["report", str(run_dir), "--no-charts"]) == 1
    summary = _strict_json(run_dir / "summary.json")
    assert summary["verdict"] == "FAIL"
    gates = {g["name"]: g for g in summary["gates"]}
    create = gates["p95_regression[create_booking]"]
    assert create["status"] == "fail" and not create["passed"]
    assert summary["comparison"]["p95"]["create_booking"]["ci_low_ms"] > 0
    cases = _junit_cases(run_dir / "junit.xml")
    failure = cases["p95_regression[create_booking]"].find("failure")
    assert failure is not None and failure.get("type") == "fail"
    assert "create_booking" in failure.get("message")
    assert cases["no_double_booking"].find("failure") is None
    root = ET.parse(run_dir / "junit.xml").getroot()
    assert int(root.find("testsuite").get("failures")) >= 3
    page = (run_dir / "report.html").read_text()
    assert '<div class="verdict FAIL" id="verdict-text">FAIL</div>' in page


def test_noise_is_not_read_as_a_regression(tmp_path: Path) -> None:
    # a tiny sample: the change may be large but the interval straddles zero
    samples = {
        "pre": synthetic_samples(60, phase="pre", seed=5),
        "post": synthetic_samples(60, phase="post", seed=6),
    }
    gates = tmp_path / "gates.toml"
    gates.write_text(
        "[p95_regression]\nmax_increase_pct = 0.0\nmax_increase_ms = 0.0\nmin_requests = 5\n"
    )
    result = _report(write_run(tmp_path / "run", samples=samples), gates)
    p95 = {g.name: g for g in result.gates if g.name.startswith("p95")}
    noisy = [g for g in p95.values() if "noise" in g.detail]
    assert noisy, [g.detail for g in p95.values()]
    assert all(g.status == "pass" for g in noisy)


def test_double_booking_after_migration_fails(tmp_path: Path) -> None:
    run_dir = standard_run(tmp_path / "run", invariants={"post": {"overlapping_holds": 2}})
    result = _report(run_dir)
    gate = next(g for g in result.gates if g.name == "no_double_booking")
    assert gate.status == "fail" and gate.value == 2
    assert result.verdict is Verdict.FAIL
    assert result.exit_status == 1


def test_missing_object_fails_and_database_text_is_escaped(tmp_path: Path) -> None:
    run_dir = standard_run(tmp_path / "run", validation_ok=False)
    result = _report(run_dir)
    gate = next(g for g in result.gates if g.name == "expected_objects")
    assert gate.status == "fail" and "allocations_no_overlap" in gate.detail
    page = result.report_html.read_text()
    assert "missing &lt;b&gt;allocations_no_overlap&lt;/b&gt;" in page
    assert "<b>allocations_no_overlap</b>" not in page


def test_expected_objects_judges_the_checks_only(tmp_path: Path) -> None:
    run_dir = standard_run(tmp_path / "run", n=300)
    validation = read_json(run_dir / "validation.json")
    # validate says "not ok" because of a double booking right after migrating:
    # that is the double-booking gate's business, the objects are all there
    validation["ok"] = False
    validation["invariants"]["overlapping_allocations"] = 3
    (run_dir / "validation.json").write_text(json.dumps(validation))
    result = _report(run_dir)
    gate = next(g for g in result.gates if g.name == "expected_objects")
    assert gate.status == "pass"
    page = result.report_html.read_text()
    assert "after migrate (validate)" in page
    validation["checks"] = []
    (run_dir / "validation.json").write_text(json.dumps(validation))
    gate = next(g for g in _report(run_dir).gates if g.name == "expected_objects")
    assert gate.status == "fail" and "no checks" in gate.detail


def test_unexpected_errors_gate_reads_the_toml_limit(tmp_path: Path) -> None:
    run_dir = standard_run(tmp_path / "run")
    gates = tmp_path / "gates.toml"
    gates.write_text("[unexpected_errors]\nmax_share_pct = 0.0\n")
    result = _report(run_dir, gates)
    gate = next(g for g in result.gates if g.name == "unexpected_errors")
    # POST_ERRORS plants deadlocks: unexpected, so a zero limit fails
    assert gate.status == "fail" and "deadlock_detected" in gate.detail
    assert _report(run_dir).verdict is Verdict.PASS


def test_rollback_gate_is_off_by_default_and_can_be_enabled(tmp_path: Path) -> None:
    run_dir = standard_run(tmp_path / "run")
    assert "rollback_drill" not in {g.name for g in _report(run_dir).gates}
    gates = tmp_path / "gates.toml"
    gates.write_text("[rollback_drill]\nenabled = true\n")
    (run_dir / "rollback.json").write_text(
        json.dumps(
            {
                "catalog_equal": False,
                "differences": ["index x"],
                "reapplied": True,
                "validation_ok": True,
            }
        )
    )
    gate = next(g for g in _report(run_dir, gates).gates if g.name == "rollback_drill")
    assert gate.status == "fail" and "index x" in gate.detail


# --------------------------------------------------------------------------
# The gates file


def test_default_gates_are_documented_values() -> None:
    gates = load_gates()
    assert gates.double_booking.max_overlaps == 0
    assert gates.p95_regression.operations == ("create_booking", "update_booking", "place_hold")
    assert gates.unexpected_errors.max_share_pct == 1.0
    assert gates.fail_when_not_measured is True


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[p95_regression]\nmax_increse_pct = 10\n", ["p95_regression.max_increse_pct"]),
        ("[nope]\nx = 1\n", ["'nope'"]),
        ("[double_booking]\nmax_overlaps = true\n", ["double_booking.max_overlaps", "whole"]),
        ("[unexpected_errors]\nmax_share_pct = '1%'\n", ["max_share_pct", "number"]),
        ("[p95_regression]\noperations = ['create_booking', 'teleport']\n", ["teleport"]),
        ("[p95_regression]\nconfidence = 1.5\n", ["p95_regression.confidence"]),
        ("double_booking = 3\n", ["double_booking", "table"]),
        ("[p95_regression\n", ["not valid TOML"]),
    ],
)
def test_bad_gates_file_is_a_config_error_naming_key_and_file(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    path = tmp_path / "my-gates.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_gates(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_cli_reports_a_bad_gates_file_in_one_line(tmp_path: Path, capsys) -> None:
    run_dir = standard_run(tmp_path / "run", n=300)
    gates = tmp_path / "g.toml"
    gates.write_text("[double_booking]\nmax_overlap = 1\n")
    assert main(["report", str(run_dir), "--gates", str(gates)]) == 2
    err = capsys.readouterr().err
    assert "double_booking.max_overlap" in err and str(gates) in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------
# Bootstrap


def test_bootstrap_same_distribution_is_noise_and_deterministic() -> None:
    rng = np.random.default_rng(7)
    a, b = rng.lognormal(1.0, 0.5, 5000), rng.lognormal(1.0, 0.5, 5000)
    ci = bootstrap_quantile_delta(a, b, resamples=500, seed=3)
    assert ci.noise and ci.low < ci.delta < ci.high
    assert ci.delta == pytest.approx(np.quantile(b, 0.95) - np.quantile(a, 0.95))
    assert bootstrap_quantile_delta(a, b, resamples=500, seed=3) == ci


def test_bootstrap_detects_a_shift_and_covers_it() -> None:
    rng = np.random.default_rng(8)
    a = rng.normal(100.0, 10.0, 20_000)
    b = rng.normal(110.0, 10.0, 20_000)
    ci = bootstrap_quantile_delta(a, b, resamples=500, max_samples=2_000, seed=1)
    assert not ci.noise and ci.low > 0
    assert ci.low < 10.0 < ci.high
    # subsampled (m-out-of-n, rescaled) against the full bootstrap: similar width
    full = bootstrap_quantile_delta(a, b, resamples=500, max_samples=50_000, seed=1)
    width, full_width = ci.high - ci.low, full.high - full.low
    assert 0.6 < width / full_width < 1.6
    # asymptotic standard error of the p95 difference of two normals
    z = 1.6448536269514722
    density = math.exp(-(z**2) / 2) / math.sqrt(2 * math.pi) / 10.0
    se = math.sqrt(2 * 0.95 * 0.05 / 20_000) / density
    assert 0.6 < full_width / (2 * 1.96 * se) < 1.6


# --------------------------------------------------------------------------
# Missing and broken inputs


def test_missing_phase_is_marked_not_run(tmp_path: Path) -> None:
    run_dir = standard_run(tmp_path / "run")
    (run_dir / samples_file("pre")).unlink()
    (run_dir / "load-pre.json").unlink()
    result = _report(run_dir)
    summary = _strict_json(result.summary_json)
    assert summary["phases"]["pre"]["present"] is False
    assert "samples-pre.parquet not found" in summary["phases"]["pre"]["missing_reason"]
    assert summary["phases"]["post"]["present"] is True
    p95 = [g for g in result.gates if g.name.startswith("p95")]
    assert all(g.status == "not_measured" and "no pre samples" in g.detail for g in p95)
    assert result.verdict is Verdict.FAIL  # cannot sign off on evidence nobody collected
    page = result.report_html.read_text()
    assert "pre: not run" in page and "samples-pre.parquet not found" in page
    cases = _junit_cases(result.junit_xml)
    failure = cases["p95_regression[place_hold]"].find("failure")
    assert failure is not None and failure.get("type") == "not_measured"
    assert "not measured (no pre samples)" in failure.get("message")


def test_not_measured_can_be_tolerated(tmp_path: Path) -> None:
    run_dir = standard_run(tmp_path / "run")
    (run_dir / samples_file("pre")).unlink()
    gates = tmp_path / "gates.toml"
    gates.write_text("fail_when_not_measured = false\n")
    result = _report(run_dir, gates)
    assert result.verdict is Verdict.PASS
    cases = _junit_cases(result.junit_xml)
    assert cases["p95_regression[create_booking]"].find("skipped") is not None


def test_empty_samples_file_is_a_phase_without_requests(tmp_path: Path) -> None:
    from harness.samples import SampleStore, write_samples

    run_dir = standard_run(tmp_path / "run", n=300)
    write_samples(run_dir / samples_file("post"), SampleStore())
    result = build_report(ReportSettings(run_dir=run_dir))  # charts too
    gates = {g.name: g for g in result.gates}
    assert gates["unexpected_errors"].status == "not_measured"
    assert "fewer than 50" in gates["p95_regression[create_booking]"].detail
    assert _strict_json(result.summary_json)["phases"]["post"]["present"] is True


def test_lost_samples_show_against_locusts_count(tmp_path: Path) -> None:
    run_dir = standard_run(tmp_path / "run", n=300)
    load = read_json(run_dir / "load-post.json")
    (run_dir / "load-post.json").write_text(json.dumps({**load, "requests": 310}))
    result = _report(run_dir)
    assert _strict_json(result.summary_json)["phases"]["post"]["counted_requests"] == 310
    page = result.report_html.read_text()
    assert "300 (Locust counted 310)" in page
    assert page.count("Locust counted") == 1  # the pre phase lost nothing


def test_only_some_files_present(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(standard_run(tmp_path / "full", n=300) / "validation.json", run_dir)
    result = _report(run_dir)
    summary = _strict_json(result.summary_json)
    assert summary["latency"] == {} and summary["error_mapping"] == []
    assert any("run.json" in m for m in summary["missing"])
    assert "No samples in any phase" in result.report_html.read_text()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_samples_file_is_one_line_naming_it(tmp_path: Path, damage: str, capsys) -> None:
    run_dir = standard_run(tmp_path / "run", n=500)
    path = run_dir / samples_file("post")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not parquet at all" * 10)
    else:
        path.write_bytes(b"")
    with pytest.raises(SamplesError) as err:
        _report(run_dir)
    assert str(path) in str(err.value)
    assert main(["report", str(run_dir)]) == 2
    captured = capsys.readouterr()
    assert str(path) in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_samples_column_of_the_wrong_type(tmp_path: Path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    run_dir = standard_run(tmp_path / "run", n=300)
    path = run_dir / samples_file("post")
    table = pq.read_table(path)
    column = table.schema.get_field_index("latency_ms")
    words = pa.array(["fast"] * table.num_rows)
    table = table.set_column(column, "latency_ms", words)
    pq.write_table(table.replace_schema_metadata({"harness_format": "1"}), path)
    assert main(["report", str(run_dir), "--no-charts"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "wrong type" in err


def test_corrupt_json_and_other_format_version(tmp_path: Path, capsys) -> None:
    run_dir = standard_run(tmp_path / "run", n=300)
    run = read_json(run_dir / RUN_FILE)
    (run_dir / RUN_FILE).write_text(json.dumps({**run, "format_version": 99}))
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "format_version 99" in err and "run.json" in err
    (run_dir / RUN_FILE).write_text(json.dumps(run))
    (run_dir / "invariants-post.json").write_text('{"phase": "post", "cou')
    assert main(["report", str(run_dir)]) == 2
    assert "invariants-post.json" in capsys.readouterr().err


def test_not_a_run_folder(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "none of the files" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unwritable_report_is_one_line(tmp_path: Path, capsys) -> None:
    run_dir = standard_run(tmp_path / "run", n=300)
    # a folder where the page should go: the rename fails, even for root
    (run_dir / "report.html").mkdir()
    assert main(["report", str(run_dir), "--no-charts"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the report into" in err and "Traceback" not in err


def test_unknown_files_are_ignored(tmp_path: Path) -> None:
    extra = {"online.json": {"from_the_future": [1]}, "future.json": [{"x": 1}]}
    run_dir = standard_run(tmp_path / "run", n=300, extra=extra)
    (run_dir / "notes.txt").write_text("hello")
    assert _report(run_dir).summary_json.exists()


# --------------------------------------------------------------------------
# What the app will see, passwords, monitoring


def test_error_mapping_suggests_the_app_response(tmp_path: Path) -> None:
    result = _report(standard_run(tmp_path / "run"))
    rows = _strict_json(result.error_mapping_json)
    by_key = {(r["sqlstate"], r["operation"]): r for r in rows}
    create = by_key[("23P01", "create_booking")]
    assert create["http_status"] == 409 and "409 Conflict" in create["response"]
    assert create["constraint"] == "allocations_no_overlap"
    assert create["counts"]["post"] == create["count"] > 0
    replay = by_key[("23505", "create_booking")]
    assert "replay the original" in replay["response"]
    hold = by_key[("23P01", "confirm_hold")]
    assert "the table is taken" in hold["response"]  # allocations_no_overlap refused it
    deadlock = by_key[("40P01", "place_hold")]
    assert deadlock["retry"] is True and deadlock["constraint"] is None
    assert rows == sorted(rows, key=lambda r: -r["count"])


def test_app_response_table() -> None:
    from harness.report import app_response

    assert app_response(
        "exclusion_violation", "23P01", "table_hold_windows_no_overlap", "place_hold"
    ).response.startswith("409 Conflict: the table is held")
    assert app_response(
        "unique_violation", "23505", "bookings_idempotency_key_key", "create_booking"
    ).response.startswith("replay the original")
    assert (
        app_response(
            "unique_violation", "23505", "booking_slots_restaurant_starts_key", "create_booking"
        ).http_status
        == 409
    )
    for outcome, status, retry in [
        ("serialization_failure", 503, True),
        ("lock_not_available", 503, True),
        ("query_canceled", 503, True),
        ("foreign_key_violation", 422, False),
        ("not_null_violation", 422, False),
        ("check_violation", 422, False),
        ("connection_error", 503, True),
    ]:
        answer = app_response(outcome, None, None, "update_booking")
        assert (answer.http_status, answer.retry) == (status, retry), outcome
    other = app_response("other", "25001", None, "create_booking")
    assert other.http_status == 500 and "SQLSTATE 25001" in other.response


def test_password_never_reaches_the_outputs(tmp_path: Path) -> None:
    secret = "s3cr3t-Pa55"
    run_dir = standard_run(
        tmp_path / "run", n=300, target_display=f"postgresql://app:{secret}@db:5432/x"
    )
    run = read_json(run_dir / RUN_FILE)
    run["settings"]["db_url"] = f"postgresql://app:{secret}@db:5432/x"
    run["settings"]["password"] = secret
    run.update(status="failed", failed_stage="rollback", error="rollback_001_003.sql: <boom>")
    run["stages"][0]["error"] = f"cannot reach postgresql://app:{secret}@db:5432/x: refused"
    run["settings"]["conninfo"] = f"host=db password={secret} user=app"
    (run_dir / RUN_FILE).write_text(json.dumps(run))
    result = _report(run_dir)
    for path in (result.report_html, result.summary_json, result.junit_xml):
        assert secret not in path.read_text(), path.name
    page = result.report_html.read_text()
    assert "app:***@db" in page
    assert "The run failed in stage rollback: rollback_001_003.sql: &lt;boom&gt;." in page
    gate = next(g for g in result.gates if g.name == "run_completed")
    assert gate.status == "fail" and gate.detail.startswith("stage rollback: ")
    assert result.verdict is Verdict.FAIL


def test_monitoring_thresholds_from_the_post_baseline(tmp_path: Path) -> None:
    result = _report(standard_run(tmp_path / "run"))
    summary = _strict_json(result.summary_json)
    rows = {(r["operation"], r["sqlstate"]): r for r in summary["monitoring"]["thresholds"]}
    everything = rows[("all", "23P01")]
    base = summary["outcome_rates"]["post"]["all"]["exclusion_violation"]
    assert everything["baseline_share"] == pytest.approx(base["share"])
    assert everything["alert_share"] == pytest.approx(max(base["share"] * 3, base["share"] + 0.005))
    assert everything["baseline_per_minute"] == pytest.approx(base["per_s"] * 60)
    assert everything["alert_per_minute"] == pytest.approx(
        max(base["per_s"] * 180, base["per_s"] * 60 + 5)
    )


def test_quarantine_is_compared_with_the_manifest(tmp_path: Path) -> None:
    run_dir = standard_run(tmp_path / "run", n=300, quarantine={**DIRT, "null_party_size": 1})
    summary = _strict_json(_report(run_dir).summary_json)
    rows = {r["reason"]: r for r in summary["integrity"]["quarantine"]}
    assert rows["null_party_size"]["match"] is False
    assert rows["overlapping_allocation"]["match"] is True


def test_lint_findings_are_listed(tmp_path: Path) -> None:
    lint = {
        "ok": False,
        "squawk_version": "2.0",
        "new": [
            {
                "file": "002_integrity.sql",
                "line": 12,
                "rule": "adding-foreign-key-constraint",
                "level": "Warning",
                "message": "<locks> both tables",
                "accepted_reason": None,
            }
        ],
        "accepted": [
            {
                "file": "003_index_triggers.sql",
                "line": 4,
                "rule": "require-timeout",
                "level": "Warning",
                "message": "m",
                "accepted_reason": "runner sets it",
            }
        ],
        "stale": [],
    }
    run_dir = standard_run(tmp_path / "run", n=300, extra={"lint.json": lint})
    result = _report(run_dir)
    summary = _strict_json(result.summary_json)
    assert summary["lint"]["new"] == 1 and summary["lint"]["accepted"] == 1
    page = result.report_html.read_text()
    assert "squawk lint: 1 new, 1 accepted" in page and "runner sets it" in page
    assert "&lt;locks&gt; both tables" in page


def test_online_lock_waits_are_shown(tmp_path: Path) -> None:
    online = {
        "interval_s": 0.1,
        "samples_taken": 40,
        "sampler_error": None,
        "files": [
            {
                "file": "002_integrity.sql",
                "started_at": "x",
                "finished_at": "y",
                "duration_s": 1.25,
                "writers_blocked": 3,
                "waits": 4,
                "longest_wait_s": 0.8,
                "total_wait_s": 1.9,
                "lock_not_available": 2,
                "query_canceled": 0,
                "blocking_statements": ["ALTER TABLE allocations ADD CONSTRAINT <x>"],
            },
        ],
        "waits": [
            {
                "pid": 1,
                "relation": "allocations",
                "mode": "RowExclusiveLock",
                "wait_s": 0.8,
                "query": "INSERT INTO allocations ...",
                "blocked_by_queries": ["ALTER TABLE"],
                "started_at": "2026-06-01T10:01:00",
            },
            {
                "pid": 2,
                "relation": "bookings",
                "mode": "RowExclusiveLock",
                "wait_s": 0.1,
                "query": "UPDATE bookings ...",
                "blocked_by_queries": [],
                "started_at": "z",
            },
        ],
        "load_phase": "online",
    }
    run_dir = standard_run(tmp_path / "run", n=300, extra={"online.json": online})
    result = _report(run_dir)
    summary = _strict_json(result.summary_json)
    assert summary["online"]["files"][0]["writers_blocked"] == 3
    assert summary["online"]["writers_blocked"] == 3
    assert summary["online"]["longest_wait_s"] == 0.8
    assert [w["wait_s"] for w in summary["online"]["longest_waits"]] == [0.8, 0.1]
    page = result.report_html.read_text()
    assert (
        "Migrating under load: 3 writer(s) blocked" in page and "ADD CONSTRAINT &lt;x&gt;" in page
    )
    assert not any("online" in m for m in summary["missing"])
    assert (
        _strict_json(_report(standard_run(tmp_path / "r2", n=300)).summary_json)["online"] is None
    )


def _nightly_json(regression: bool) -> dict:
    history = [
        {
            "run_id": f"2026060{i}T000000_000000Z",
            "recorded_at": "x",
            "status": "completed",
            "verdict": "PASS",
            "p95_ms|create_booking": 6.0 + i,
            "p95_ms|place_hold": 5.0,
            "share|all|deadlock_detected": 0.001 * i,
            "migration_s|002_integrity.sql": 1.0 + i / 10,
        }
        for i in range(1, 5)
    ]
    return {
        "profile": {"seed": 7},
        "compared_with": 3,
        "compared_runs": [h["run_id"] for h in history[:3]],
        "regressions": [],
        "comparisons": [
            {
                "kind": "p95",
                "name": "p95 create_booking",
                "current": 10.0,
                "baseline": 7.0,
                "limit": 8.0,
                "regression": regression,
                "detail": "p95 create_booking <grew>",
            },
            {
                "kind": "migration",
                "name": "migration 002_integrity.sql",
                "current": 1.4,
                "baseline": 1.2,
                "limit": 2.0,
                "regression": False,
                "detail": "within",
            },
        ],
        "history": history,
    }


def test_nightly_comparisons_become_junit_cases_and_a_trend_chart(tmp_path: Path) -> None:
    run_dir = standard_run(tmp_path / "run", n=1500, extra={"nightly.json": _nightly_json(True)})
    result = build_report(ReportSettings(run_dir=run_dir))
    assert result.verdict is Verdict.PASS  # the verdict judges the gates; CI sees both
    root = ET.parse(result.junit_xml).getroot()
    suites = root.findall("testsuite")
    assert len(suites) == 2
    cases = {c.get("name"): c for c in suites[1].iter("testcase")}
    assert cases["p95 create_booking"].find("failure").get("message") == (
        "p95 create_booking <grew>"
    )
    assert cases["migration 002_integrity.sql"].find("failure") is None
    assert root.get("failures") == "1"
    assert root.get("tests") == str(len(result.gates) + 2)
    page = result.report_html.read_text()
    assert "Nightly: 1 regression(s)" in page and "&lt;grew&gt;" in page
    assert page.count('src="data:image/png;base64,') == 5
    summary = _strict_json(result.summary_json)
    assert summary["nightly"]["regressions"] == 1


def test_charts_are_embedded_png(tmp_path: Path) -> None:
    run_dir = standard_run(tmp_path / "run", n=2000)
    result = build_report(ReportSettings(run_dir=run_dir))
    page = result.report_html.read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert "http://" not in page and "https://" not in page


def test_reads_samples_written_by_the_load_stage_writer(tmp_path: Path) -> None:
    from harness.samples import SampleStore, write_samples

    run_dir = standard_run(tmp_path / "run", n=300)
    store = SampleStore()
    for i in range(200):
        refused = i % 10 == 0
        store.add(
            ts=START_TS + i * 0.05,
            phase="post",
            operation="create_booking",
            outcome="exclusion_violation" if refused else "ok",
            sqlstate="23P01" if refused else None,
            constraint="allocations_no_overlap" if refused else None,
            latency_ms=float(i + 1),
            user=i % 7,
            worker="local",
        )
    write_samples(run_dir / samples_file("post"), store)
    summary = _strict_json(_report(run_dir).summary_json)
    create = summary["latency"]["post"]["create_booking"]
    assert create["requests"] == 200
    assert create["p95_ms"] == pytest.approx(np.quantile(np.arange(1, 201), 0.95))
    rows = summary["outcome_rates"]["post"]["create_booking"]
    assert rows["exclusion_violation"]["share"] == pytest.approx(0.1)
    mapped = [r for r in summary["error_mapping"] if r["counts"].get("post")]
    assert mapped == [
        {
            "sqlstate": "23P01",
            "outcome": "exclusion_violation",
            "constraint": "allocations_no_overlap",
            "operation": "create_booking",
            "count": 20,
            "counts": {"pre": 0, "post": 20},
            "http_status": 409,
            "response": mapped[0]["response"],
            "retry": False,
        }
    ]


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("run.json", {"format_version": 1, "stages": "nope", "target": None, "settings": []}),
        ("run.json", {"format_version": 1, "stages": [1, None], "status": 3}),
        ("manifest.json", {"dirt": [1, 2], "rows": "many", "seed": {"x": 1}}),
        ("ledger.json", [{"file": "001.sql"}, {"file": 2, "duration_s": "slow"}]),
        ("ledger.json", [{"sha256": "x"}]),
        ("validation.json", {"ok": True, "checks": [{"name": "x"}], "quarantine": [1]}),
        ("validation.json", {"ok": True, "checks": "all"}),
        ("invariants-post.json", {"counts": {"overlapping_allocations": "two"}}),
        ("invariants-post.json", {"counts": [1]}),
        ("load-post.json", {"duration_s": "long", "users": None, "contention": [1]}),
        ("rollback.json", {"differences": "x", "catalog_equal": "maybe"}),
        ("lint.json", {"new": [1, {"file": None}], "accepted": "x"}),
        ("online.json", {"files": [{"writers_blocked": "x"}], "waits": [{"wait_s": "y"}]}),
        ("nightly.json", {"comparisons": [1, {"name": None}], "history": [{"run_id": 1}, 2]}),
        ("run.json", [1, 2, 3]),
        ("run.json", {"format_version": 1, "target": {"display": 5, "server_version": [1]}}),
        ("manifest.json", {"rows": {"bookings": "many"}}),
        ("load-pre.json", {"users": {"a": 1}, "mode": ["lax"], "interrupted": "yes"}),
        ("validation.json", {"checks": [{"name": ["x"], "ok": "no", "validated": 3}]}),
    ],
)
def test_odd_json_is_reported_or_a_clear_error(
    tmp_path: Path, name: str, payload: object, capsys
) -> None:
    run_dir = standard_run(tmp_path / "run", n=300)
    (run_dir / name).write_text(json.dumps(payload))
    status = main(["report", str(run_dir), "--no-charts"])
    err = capsys.readouterr().err
    assert "internal error" not in err and "Traceback" not in err, err
    if status == 2:
        assert name in err
    else:
        assert status in (0, 1)
        _strict_json(run_dir / "summary.json")
