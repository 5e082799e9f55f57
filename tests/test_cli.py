"""The `counterpoint` command: generate prints transformers' greedy text; bad flags exit 2;
bench throughput runs end to end against transformers and writes JSON."""

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from counterpoint.serving.cli import main

from test_greedy_vs_transformers import hf_greedy


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "counterpoint.serving", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_prints_the_greedy_completion(llama_dir):
    proc = run("generate", "--model", str(llama_dir), "--prompt", "The quick brown fox", "--max-tokens", "10")
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(llama_dir)
    ref = hf_greedy(llama_dir, tok.encode("The quick brown fox"), 10, stop_at_eos=True)
    ref = ref[: ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref
    assert proc.stdout.rstrip("\n") == tok.decode(ref, skip_special_tokens=True)


def test_bad_flags_exit_2_with_one_line(llama_dir, capsys):
    """One bad flag through the real command; the rest through its `main`, in this process (the
    same parser and error path, without a second start-up of torch each)."""
    proc = run("generate", "--model", str(llama_dir), "--prompt", "hi", "--temperature", "-1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("counterpoint")
    assert "usage: counterpoint generate" in proc.stderr  # the subcommand's usage, not the top level's
    for args, expected in [
        (["generate", "--model", str(llama_dir), "--prompt", "hi", "--top-p", "2"], "usage: counterpoint generate"),
        (["generate", "--model", str(llama_dir), "--prompt", "hi", "--n", "0"], "usage: counterpoint generate"),
        (["generate", "--model", str(llama_dir), "--prompt", "hi", "--dtype", "int3"], "usage: counterpoint generate"),
        (["generate", "--model", "/nonexistent/model", "--prompt", "hi"], "config.json not found"),
        (["serve", "--model", f"a={llama_dir}", "--model", f"a={llama_dir}"], "'a' is given twice"),
        (["serve", "--kv-cache-memory", "-1"], "--kv-cache-memory"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2, args
        assert stderr.strip().splitlines()[-1].startswith("counterpoint") and expected in stderr, (args, stderr)


def test_serve_exits_2_when_a_model_cannot_be_loaded(tmp_path):
    """A missing path is one line before the server starts; a model that fails while loading (here:
    a config with no weights) stops the server with exit code 2 rather than leaving it up on 503."""
    proc = run("serve", "--model", str(tmp_path / "missing"), "--port", "0", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"counterpoint: error: {tmp_path / 'missing'} is not a Hugging "
                                                "Face model directory: config.json not found"]
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=300).save_pretrained(tmp_path / "no-weights")
    proc = run("serve", "--model", str(tmp_path / "no-weights"), "--port", "0", timeout=120)
    assert proc.returncode == 2 and "loading the models failed: no .safetensors files" in proc.stderr


def test_every_flag_has_help():
    import argparse

    from counterpoint.serving.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(child, f"{path} {name}")
            elif action.option_strings and action.dest != "help":
                yield path, action

    missing = [f"{path} {action.option_strings[0]}" for path, action in walk(build_parser(), "counterpoint")
               if not action.help]
    assert not missing, "flags without help: " + ", ".join(missing)


def test_bench_throughput_writes_json(llama_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = run("bench", "throughput", "--model", str(llama_dir), "--concurrency", "1", "3", "--input-len", "8",
               "--output-len", "6", "--json", str(out), "--device", "cpu", "--enforce-eager")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [r["concurrency"] for r in result["results"]] == [1, 3]
    for row in result["results"]:
        assert row["counterpoint_tok_s"] > 0 and row["transformers_tok_s"] > 0 and row["ratio"] > 0


def test_bench_latency_reports_percentiles(llama_dir, tmp_path):
    out = tmp_path / "latency.json"
    proc = run("bench", "latency", "--model", str(llama_dir), "--batch-size", "2", "--input-len", "8",
               "--output-len", "4", "--iters", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["p50_s"] <= result["p99_s"] and result["mean_ttft_s"] <= result["mean_s"]


def test_generate_with_beams_and_an_amateur_prints_the_offline_text(llama_dir, amateur_dir):
    from counterpoint.decoding import SamplingParams
    from counterpoint.serving import LLM

    args = ["--prompt", "The quick brown fox", "--max-tokens", "8"]
    proc = run("generate", "--model", str(llama_dir), "--amateur", str(amateur_dir), "--cd-alpha", "0.2",
               "--beam-width", "3", "--n", "2", *args)
    assert proc.returncode == 0, proc.stderr
    llm = LLM(str(llama_dir), amateur=str(amateur_dir), show_progress=False)
    params = SamplingParams(max_tokens=8, temperature=0, use_beam_search=True, n=2, best_of=3,
                            contrastive={"amateur": "amateur", "alpha": 0.2})
    out = llm.generate("The quick brown fox", params, use_tqdm=False)[0]
    assert proc.stdout.rstrip("\n").split("\n") == [o.text for o in out.outputs]


def test_bench_beam_and_contrastive_write_json(llama_dir, amateur_dir, tmp_path):
    small = ["--input-len", "8", "--output-len", "4", "--json"]
    proc = run("bench", "beam", "--model", str(llama_dir), "--widths", "2", "--concurrency", "2", *small,
               str(tmp_path / "beam.json"))
    assert proc.returncode == 0, proc.stderr
    row = json.loads((tmp_path / "beam.json").read_text())["results"][0]
    assert row["peak_blocks"] <= row["peak_blocks_copy_everything"] and row["transformers_tok_s"] > 0
    proc = run("bench", "contrastive", "--model", str(llama_dir), "--amateur", str(amateur_dir), "--concurrency",
               "1", "2", *small, str(tmp_path / "cd.json"))
    assert proc.returncode == 0, proc.stderr
    assert [r["concurrency"] for r in json.loads((tmp_path / "cd.json").read_text())["results"]] == [1, 2]


def test_bench_context_contrast_writes_json(llama_dir, tmp_path):
    proc = run("bench", "context-contrast", "--model", str(llama_dir), "--concurrency", "1", "2", "--document-len",
               "12", "--question-len", "4", "--output-len", "3", "--json", str(tmp_path / "cc.json"))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "cc.json").read_text())["results"]
    assert [r["concurrency"] for r in rows] == [1, 2] and all(r["contrast_tok_s"] > 0 for r in rows)


def test_help_does_not_import_torch():
    """`counterpoint --help` must answer fast: the CLI imports heavy modules only in a subcommand."""
    code = "import sys\nfrom counterpoint.serving.cli import build_parser\nbuild_parser()\n" \
           "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"



def test_generate_with_documents_and_context_contrast_prints_the_offline_text(llama_dir):
    from counterpoint.decoding import SamplingParams
    from counterpoint.serving import LLM

    docs = ["Paris is the capital of France.", "Rome is in Italy."]
    proc = run("generate", "--model", str(llama_dir), "--prompt", "The capital of France is", "--max-tokens", "8",
               "--document", docs[0], "--document", docs[1], "--context-contrast", "cad", "--cc-alpha", "1.5")
    assert proc.returncode == 0, proc.stderr
    llm = LLM(str(llama_dir), show_progress=False)
    params = SamplingParams(max_tokens=8, temperature=0, context_contrast={"method": "cad", "alpha": 1.5})
    out = llm.generate("The capital of France is", params, documents=docs, use_tqdm=False)[0]
    # NOTE: text mode reads any \r the random model printed as \n
    assert proc.stdout.rstrip("\n") == out.outputs[0].text.replace("\r\n", "\n").replace("\r", "\n")
    proc = run("generate", "--model", str(llama_dir), "--prompt", "hi", "--context-contrast", "acd")
    assert proc.returncode == 2 and "needs at least one --document" in proc.stderr


def test_bench_compare_starts_loads_and_stops_a_real_server(llama_dir, tmp_path):
    """One server, to keep the suite short: the ranking across servers is checked by hand below."""
    serve = f"{sys.executable} -m counterpoint.serving serve --model {llama_dir} --port {{port}}"
    out = tmp_path / "compare.json"
    proc = run("bench", "compare", "--server", f"only={serve}", "--concurrency", "1", "2", "--rounds", "1",
               "--input-len", "8", "--output-len", "3", "--max-token-id", "300", "--min-prompts", "2",
               "--prompts-per-slot", "1", "--log-dir", str(tmp_path), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [(r["server"], r["concurrency"], r["num_requests"]) for r in result["runs"]] == [("only", 1, 2),
                                                                                            ("only", 2, 2)]
    assert all(r["output_tok_s"] > 0 and r["ttft_ms"] > 0 for r in result["runs"])
    assert [row["first_over_this"] for row in result["best"]] == [1.0, 1.0]
    assert (tmp_path / "only.log").is_file()


def test_bench_compare_keeps_each_servers_quietest_round():
    from counterpoint.serving.bench.compare import best_rounds

    runs = [dict(round=r, server=s, concurrency=1, output_tok_s=v)
            for r, s, v in [(0, "a", 10.0), (0, "b", 8.0), (1, "a", 12.0), (1, "b", 6.0)]]
    table = best_rounds(runs, ["a", "b"], [1])
    assert [(row["server"], row["round"], row["first_over_this"]) for row in table] == [("a", 1, 1.0), ("b", 0, 1.5)]


def test_bench_compare_writes_strict_json_for_beam_search(capsys):
    """Beam search answers in one response, so there is no inter-token latency: the row says so
    with null (strict JSON) and the table with a dash."""
    from counterpoint.serving.bench.compare import _figures, print_table
    from counterpoint.serving.bench.serve import RequestResult, summarize

    summary = summarize([RequestResult(ok=True, ttft=2.0, latency=2.0, output_tokens=12)], elapsed=4.0)
    row = dict(concurrency=1, server="beams", first_over_this=1.0, **_figures(summary))
    assert row["itl_ms"] is None and row["output_tok_s"] == 3.0 and row["ttft_ms"] == 2000.0
    json.dumps(row, allow_nan=False)
    print_table([row])
    assert capsys.readouterr().out.splitlines()[-1].split() == ["1", "beams", "3.0", "2000", "-", "1.00"]
