"""`bench quant` end to end on a tiny model: every row measured, in processes of their own."""

import json

from counterpoint.serving.cli import main


def test_bench_quant_measures_each_format(llama_dir, tmp_path):
    out = tmp_path / "quant.json"
    texts = [tmp_path / f"text{i}.txt" for i in range(5)]  # documents: some are held out for the perplexity
    for i, text in enumerate(texts):
        text.write_text(f"{i} The quick brown fox jumps over the lazy dog. Paris is the capital of France.\n" * 20)
    main(["bench", "quant", "--model", str(llama_dir), "--formats", "bf16", "bnb-int8", "--dtype", "bfloat16",
          "--ppl-rows", "2", "--seq-len", "32", "--ppl-files", *map(str, texts), "--concurrency", "1", "2",
          "--output-len", "4", "--json", str(out)])
    result = json.loads(out.read_text())
    rows = {row["format"]: row for row in result["results"]}
    assert set(rows) == {"bf16", "bnb-int8"}
    assert rows["bnb-int8"]["kinds"] == ["int8 (torch CPU kernel)"] and rows["bf16"]["kinds"] == []
    assert rows["bnb-int8"]["weight_mib"] < rows["bf16"]["weight_mib"]
    for row in rows.values():
        assert 1 < row["perplexity"] < 10 * 384  # a random model: about its vocabulary size, never NaN
        assert row["tok_s_c1"] > 0 and row["tok_s_c2"] > 0 and row["load_s"] > 0 and row["rss_mib"] > 0
