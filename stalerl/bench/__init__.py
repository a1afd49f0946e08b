"""``stalerl bench``: stalerl measured side by side with its peers, on this machine, in one run.

    stalerl bench --out DIR            # the full suite, several minutes on 2 CPU cores
    stalerl bench --out DIR --quick    # a smoke version: tiny step counts, one repeat

Writes DIR/bench.json and prints a table. Every timed run is a fresh process (one torch thread unless
said otherwise), so runs do not share allocator state and each one's peak RSS is its own: forked
from a server that has imported stalerl, torch and transformers and run nothing, or, on a GPU
machine, a spawned interpreter (runs.py, stalerl/forking.py). Variants alternate within each repeat so machine noise hits all; medians are reported.

* step:   one GRPO step of stalerl at S = 0 vs TRL's GRPOTrainer on the same work (trl_step.py),
          stalerl running every sequence whole, prompt included (model.share_prompt_prefix=false),
          and stalerl skipping the padding after short responses (optim.skip_padding=true)
* gen:    TransformersEngine.generate vs a plain ``model.generate(do_sample=True)`` on the same batch,
          and the engine with every row's prompt prefilled
* async:  steps/s at S = 1, 2, 4 vs S = 0 against the ideal overlap (t_gen + t_train) / max(t_gen, t_train),
          t_gen being the rollout side's time per batch (sampling, reward, weight load)
* sweep:  12 cells of the embedded default with 2 workers vs the same cells one at a time
* memory: peak RSS against S (exact mode) and against the batch size

With ``--model DIR`` (a Hugging Face checkpoint, or ``random:llama-3.2-1b`` for that shape with
random weights) and ``--data FILE`` the gen and async parts time that model on the math task, on a
GPU where there is one; the other parts time the embedded default only:

    stalerl bench --out DIR --model random:llama-3.2-1b --data data/gsm8k_sample.jsonl

The package, a module per part:

    plan.py        the presets (QUICK, FULL, CHECKPOINT) and the config every timed run starts from
    runs.py        a timed run in a fresh interpreter (isolated) and the one that times train()
    step.py        step;  trl_step.py: TRL's GRPOTrainer on the same work (the `bench` extra)
    generation.py  gen
    overlap.py     async
    sweep.py       sweep
    memory.py      memory
    suite.py       run_bench: the parts in order, bench.json, the parts an earlier report keeps
    table.py       the printed table;  cli.py: the command line
"""
