"""`bench quant`'s per-format run on a tiny model (in this process; the command runs each format
in a process of its own)."""

from counterpoint.serving.bench.quant import _plot, worker


def test_bench_quant_measures_each_format(llama_dir, tmp_path):
    texts = [tmp_path / f"text{i}.txt" for i in range(5)]  # documents: some are held out for the perplexity
    for i, text in enumerate(texts):
        text.write_text(f"{i} The quick brown fox jumps over the lazy dog. Paris is the capital of France.\n" * 20)
    spec = dict(path=str(llama_dir), concurrency=[1, 2], input_len=8, output_len=4, ppl_rows=2, seq_len=32,
                ppl_files=[str(t) for t in texts], dtype="bfloat16", threads=1, seed=0)
    rows = {name: worker(dict(spec, format=name, quantization=flag))
            for name, flag in (("bf16", "none"), ("bnb-int8", "bnb-int8"))}
    assert rows["bnb-int8"]["kinds"] == ["int8 (torch CPU kernel)"] and rows["bf16"]["kinds"] == []
    assert rows["bnb-int8"]["weight_mib"] < rows["bf16"]["weight_mib"]
    for row in rows.values():
        assert 1 < row["perplexity"] < 10 * 384  # a random model: about its vocabulary size, never NaN
        assert row["tok_s_c1"] > 0 and row["tok_s_c2"] > 0 and row["load_s"] > 0 and row["rss_mib"] > 0
    _plot(list(rows.values()), [1, 2], str(tmp_path / "quant.png"))
    assert (tmp_path / "quant.png").stat().st_size > 0
