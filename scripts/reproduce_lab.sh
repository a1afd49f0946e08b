#!/usr/bin/env bash
# Reruns what docs/lab.md reports (sections 1, 2 and 4, and the second seed) into OUT.
#
#     bash scripts/reproduce_lab.sh runs/lab      # about 15 minutes on 2 CPU cores
#
# Every command is resumable (a sweep skips finished cells), so a killed run picks up where it
# stopped when started again. The bias probe (section 3) is its own command, in docs/lab.md.
set -euo pipefail
out=${1:?usage: reproduce_lab.sh OUT}
stalerl=${STALERL:-stalerl}
grid="--steps 200 --workers 2 --no-progress"

# 1. The sweep, S x eta, and 2. the advice it gives.
$stalerl sweep --staleness 0,4,16 --lr 1e-4,2e-4,3e-4,5e-4,7e-4,1e-3,3e-3 $grid --out "$out/sweep"
$stalerl advise "$out/sweep" --staleness 0,4,16 --steps 200 --json "$out/advise.json"

# 2. The probe: 11% of the sweep's compute.
$stalerl sweep -S 0 --lr 1e-4,3e-4,1e-3 $grid --out "$out/probe" --set collapse.stop_early=true
$stalerl sweep -S 16 --lr 1e-3 $grid --out "$out/probe" --set collapse.stop_early=true
$stalerl advise "$out/probe" --staleness 0,4,16 --steps 200 --json "$out/probe/advise.json"

# 2. A second seed: its sweep and the same probe.
$stalerl sweep --staleness 0,4,16 --lr 2e-4,3e-4,5e-4,7e-4 --seeds 1 $grid --out "$out/seed1/sweep"
$stalerl sweep -S 0 --lr 1e-4,3e-4,1e-3 --seeds 1 $grid --out "$out/seed1/probe" --set collapse.stop_early=true
$stalerl sweep -S 16 --lr 1e-3 --seeds 1 $grid --out "$out/seed1/probe" --set collapse.stop_early=true
$stalerl advise "$out/seed1/probe" --staleness 0,4,16 --steps 200 --json "$out/seed1/probe/advise.json"

# 4. Stabilizers at a base rate where the fixed one collapses, at three R_batch: as `advise` measured
# it on the sweep when section 4 was first run (2.33, by the earlier, late T_c), as it measures it
# now (1.46), and 0.9 (the earlier clip-fraction estimate).
$stalerl sweep --staleness 4,16 --lr 1e-3 --stabilizers none,staleness,ess,gac $grid --out "$out/sweep" \
    --set stabilizer.r_batch=2.33
$stalerl sweep --staleness 4,16 --lr 1e-3 --stabilizers staleness $grid --out "$out/stab-r0.9" \
    --set stabilizer.r_batch=0.9
$stalerl sweep --staleness 4,16 --lr 1e-3 --stabilizers staleness $grid --out "$out/stab-r1.46" \
    --set stabilizer.r_batch=1.46
$stalerl plot "$out/sweep" "$out/stab-r0.9" "$out/stab-r1.46"
