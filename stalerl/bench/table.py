"""The short table that `stalerl bench` prints from bench.json."""

from __future__ import annotations

import statistics

OFF_STEADY = 0.10  # an async row whose rate is this far off sides_rate() is flagged in the table


def format_table(report: dict) -> str:
    machine = report["machine"]
    lines = [f"stalerl bench ({'quick' if report['quick'] else 'full'}, {report['plan']['repeats']} repeat(s), "
             f"medians; {machine['cpus']} CPUs, load {machine['load_avg_before'][0]:.1f} -> "
             f"{machine['load_avg_after'][0]:.1f}; GPU {machine['gpu'] or 'none'})",
             f"model {report['model']['checkpoint']}"]
    if report["quick"]:  # e.g. the sweep's 2-step cells are mostly their workers' start-up
        lines.append("quick: a smoke test of every part, at sizes too small to measure; quote the full suite's figures")
    if "step" in report:
        step = report["step"]
        ours = step["stalerl"]
        text = f"step  stalerl S=0 {ours['s_per_step']:.3f} s ({ours['samples_per_s']:.0f} samples/s)"
        if step["trl"]:
            text += (f" | TRL {step['trl_version']} GRPOTrainer {step['trl']['s_per_step']:.3f} s "
                     f"({step['trl']['samples_per_s']:.0f} samples/s) | stalerl {step['ratio_trl_over_stalerl']:.2f}x faster")
        else:
            text += " | TRL not installed (pip install 'stalerl[bench]')"
        lines.append(text)
        lines.append(f"      stalerl with prompts run whole {step['stalerl_whole_prompts']['s_per_step']:.3f} s: "
                     f"sharing a group's prompt makes the step {step['prompt_sharing_speedup']:.2f}x faster")
        if "stalerl_skip_padding" in step:  # benches before optim.skip_padding have no such runs
            text = (f"      stalerl with optim.skip_padding {step['stalerl_skip_padding']['s_per_step']:.3f} s: "
                    f"speedup over the default {step['skip_padding_speedup']:.2f}x")
            if step["trl"]:
                text += f"; over TRL {step['ratio_trl_over_stalerl_skip_padding']:.2f}x"
            lines.append(text)
    if "gen" in report:
        gen = report["gen"]
        lines.append(f"gen   stalerl engine {gen['stalerl']['tokens_per_s']:.0f} tokens/s | plain generate "
                     f"{gen['plain_generate']['tokens_per_s']:.0f} tokens/s | ratio {gen['ratio_stalerl_over_plain']:.2f}x "
                     f"(prompts prefilled whole: {gen['ratio_whole_prompts_over_plain']:.2f}x)")
        if "stalerl_static_cache" in gen:
            lines.append(f"      static cache (compiled decoding): stalerl engine {gen['stalerl_static_cache']['tokens_per_s']:.0f} "
                         f"tokens/s, first call {gen['stalerl_static_cache']['first_call_s']:.0f} s | plain generate "
                         f"{gen['plain_generate_static_cache']['tokens_per_s']:.0f} tokens/s | ratio "
                         f"{gen['ratio_static_over_plain_static']:.2f}x; {gen['ratio_static_over_stalerl']:.2f}x the dynamic-cache engine")
        elif "static_cache_error" in gen:
            lines.append(f"      static cache (compiled decoding) failed: {gen['static_cache_error']}")
    if "async" in report:
        pipe = report["async"]
        def cells(worker: str) -> str:
            return ", ".join(f"S={row['S']} {row['steps_per_s']:.2f}/s {row['speedup']:.2f}x "
                             f"({row['fraction_of_ideal']:.0%} of ideal)" for row in pipe["rows"]
                             if row.get("worker", "thread") == worker and (worker == "thread" or row["S"] > 0))
        lines.append(f"async ideal {pipe['ideal_overlap']:.2f}x (t_gen {pipe['t_gen_s']:.3f} s, of which sampling "
                     f"{pipe['t_sample_s']:.3f} s and weight sync {pipe['weight_sync_s'] * 1e3:.1f} ms; "
                     f"t_train {pipe['t_train_s']:.3f} s): {cells('thread')}")
        if any(row.get("worker") == "process" for row in pipe["rows"]):
            walls = {(row["S"], row["worker"]): row["wall_s"] for row in pipe["rows"]}
            start_up = statistics.median(walls[(s, "process")] - walls[(s, "thread")]
                                         for s, worker in walls if worker == "process")
            lines.append(f"      rollout worker in a process: {cells('process')}; each run {start_up:+.1f} s "
                         f"of wall time against the thread's (start-up: spawned, as in any bench run; "
                         f"`stalerl train` forks it on CPU)")
        elif "process_worker_error" in pipe:
            lines.append(f"      rollout worker in a process failed: {pipe['process_worker_error']}")
        if any(row.get("worker") == "own_stream" for row in pipe["rows"]):
            lines.append(f"      rollout thread on a CUDA stream of its own: {cells('own_stream')}")
        elif "own_stream_worker_error" in pipe:
            lines.append(f"      rollout thread on a CUDA stream of its own failed: {pipe['own_stream_worker_error']}")
        if "unfinished" in pipe:
            lines.append(f"      unfinished: the bench stopped after {pipe['unfinished'][0]} of its "
                         f"{pipe['unfinished'][1]} async runs")
        off = [row for row in pipe["rows"] if "sides_steps_per_s" in row
               and abs(row["steps_per_s"] / row["sides_steps_per_s"] - 1) > OFF_STEADY]
        if off:
            lines.append("      not steady (rate against what its median batch and step allow): " + ", ".join(
                f"S={row['S']} {row.get('worker', 'thread')} {row['steps_per_s']:.2f}/s against "
                f"{row['sides_steps_per_s']:.2f}/s" for row in off) + "; time more steps: --async-steps")
    if "sweep" in report:
        sweep = report["sweep"]
        lines.append(f"sweep {sweep['cells']} cells x {sweep['steps']} steps: 2 workers {sweep['parallel_wall_s']:.0f} s "
                     f"vs sum of single runs {sweep['sum_of_single_runs_s']:.0f} s "
                     f"({sweep['parallel_over_sum_of_runs']:.0%}; bound {sweep['bound']:.0%}: single runs use "
                     f"{sweep['single_runs_cores_used']:.2f} cores each); cores busy {sweep['core_utilisation']:.0%}; "
                     f"serial wall {sweep['serial_wall_s']:.0f} s")
    if "memory" in report:
        memory = report["memory"]
        per_s = ", ".join(f"S={row['S']} {row['peak_rss_mb']:.0f} MB" for row in memory["rows"]
                          if row["model"] == "wide" and not row["cycle_history"])
        history = memory["weight_copies_per_unit_S_with_history"]
        lines.append(f"mem   wide model ({memory['weight_mb_wide']:.0f} MB of weights), exact mode, the pipeline "
                     f"alone: {per_s}; {memory['weight_copies_per_unit_S_pipeline_only']:.2f} weight copies per unit "
                     f"S; with the cycle-drift history "
                     f"{'-' if history is None else f'{history:.2f}'} per unit S up to S = "
                     f"{memory['history_kept_up_to_S']} (none kept above); "
                     f"{memory['mb_per_prompt']:.1f} MB per prompt (x G samples)")
    for part, source in report.get("earlier_parts", {}).items():
        model = (source.get("model") or {}).get("checkpoint", "embedded default")
        lines.append(f"({part}: kept from an earlier bench in this directory, "
                     f"{'quick' if source.get('quick') else 'full'}, model {model})")
    return "\n".join(lines)
