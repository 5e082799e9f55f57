"""`bench compare`: several OpenAI-compatible servers, one at a time, under the same load.

Each server is a shell command with `{port}` where its port goes. For every round, every server
in turn is started, loaded at each concurrency with `bench serve`'s client (the same prompts, EOS
ignored), then stopped, so rounds interleave the servers and a noisy machine hurts them alike. The
table gives each server's best round (the quietest) and the first server's throughput over it.
"""

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import time
from types import SimpleNamespace

import httpx

from counterpoint.serving.bench.serve import run_load, summarize


def server_spec(text: str) -> tuple[str, str]:
    name, sep, command = text.partition("=")
    if not sep or not name or "{port}" not in command:
        raise argparse.ArgumentTypeError(f"must be NAME=COMMAND with {{port}} in the command; got {text!r}")
    return name, command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server command run in its own process group, up until `stop`."""

    def __init__(self, command: str, log_path: str, startup_timeout: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(command.format(port=self.port), shell=True, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.model = self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> str:
        """The first served model id, once /v1/models answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with status {self.proc.returncode}; see {self.log.name}")
            try:
                return httpx.get(f"{self.url}/v1/models", timeout=5).json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError):
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def load(server: Server, args, concurrency: int) -> dict:
    load_args = SimpleNamespace(base_url=server.url, model=server.model, api_key=None, dataset=None,
                                input_len=args.input_len, max_token_id=args.max_token_id,
                                output_len=args.output_len, request_rate=None,
                                max_concurrency=concurrency, seed=args.seed, beam_width=args.beam_width,
                                num_prompts=max(args.min_prompts, args.prompts_per_slot * concurrency))
    summary = summarize(*asyncio.run(run_load(load_args)))
    if summary["num_failed"]:
        raise RuntimeError(f"{summary['num_failed']} requests failed at concurrency {concurrency}: {summary['errors']}")
    return summary


def compare(args) -> dict:
    runs = []  # one row per (round, server, concurrency)
    for round_idx in range(args.rounds):
        for name, command in args.server:
            server = Server(command, os.path.join(args.log_dir, f"{name}.log"), args.startup_timeout)
            try:
                load(server, args, min(args.concurrency))  # warm-up: first-call costs out of the timed runs
                for concurrency in args.concurrency:
                    summary = load(server, args, concurrency)
                    runs.append(dict(round=round_idx, server=name, concurrency=concurrency, **_figures(summary)))
                    print(f"round {round_idx + 1} {name} c={concurrency}: {runs[-1]['output_tok_s']:.1f} tok/s")
            finally:
                server.stop()
    table = best_rounds(runs, [name for name, _ in args.server], args.concurrency)
    print_table(table)
    return dict(benchmark="compare", input_len=args.input_len, output_len=args.output_len, beam_width=args.beam_width,
                servers=dict(args.server), runs=runs, best=table)


def _figures(summary: dict) -> dict:
    itl = summary["itl_s"].get("mean")  # NOTE: none in beam search's single responses
    return dict(output_tok_s=summary["output_token_throughput"], ttft_ms=1000 * summary["ttft_s"]["mean"],
                itl_ms=None if itl is None else 1000 * itl, num_requests=summary["num_requests"])


def best_rounds(runs: list[dict], names: list[str], concurrencies: list[int]) -> list[dict]:
    """Per concurrency and server, the round with the most output tokens/s, and names[0]'s tokens/s
    over that server's."""
    table = []
    for concurrency in concurrencies:
        best = {name: max((r for r in runs if r["server"] == name and r["concurrency"] == concurrency),
                          key=lambda r: r["output_tok_s"]) for name in names}
        base = best[names[0]]["output_tok_s"]
        for name in names:
            table.append(dict(best[name], first_over_this=base / best[name]["output_tok_s"]))
    return table


def print_table(table: list[dict]) -> None:
    print(f"{'concurrency':>11} {'server':<16}{'tok/s':>9}{'TTFT ms':>10}{'ITL ms':>9}{'first/this':>11}")
    for row in table:
        itl = "-" if row["itl_ms"] is None else f"{row['itl_ms']:.1f}"
        print(f"{row['concurrency']:>11} {row['server']:<16}{row['output_tok_s']:>9.1f}{row['ttft_ms']:>10.0f}"
              f"{itl:>9}{row['first_over_this']:>11.2f}")
