"""`normlab bench`'s eager vs torch.compile table (timings are not asserted, only its shape)."""

from normlab.bench import format_compile_table, run_compile_bench


def test_compile_table_has_an_eager_and_a_compiled_row_per_norm():
    rows = run_compile_bench(batch=4, rounds=1, norms=("bn", "frn"), models=("cnn2",),
                             backend="aot_eager")
    assert [(r["norm"], r["mode"]) for r in rows] == [
        ("bn", "eager"), ("bn", "compiled"), ("frn", "eager"), ("frn", "compiled")]
    assert rows[1]["vs_compiled_bn"] == 1.0
    assert all(r["step_ms"] > 0 for r in rows)
    table = format_compile_table(rows)
    assert "| cnn2 | frn | compiled | 4 |" in table and "vs compiled bn" in table
