"""AdamW step over a DINO method's parameters: torch's fused kernel (medfoundry's default) vs ``foreach``.

Builds the real :class:`~medfoundry.methods.dino.method.DINOMethod` of ``bench_train_step.py --peer dinov2``
(ViT-S/16 student + DINOv2 head with 65,536 prototypes: 44 M trainable parameters by default), its optimizer as the
training loop builds it (:func:`medfoundry.train.optim.build_optimizer`, scheduled lr / weight decay), gives every
parameter a random gradient and times ``--steps`` optimizer steps per kind in alternating blocks. Per kind it prints
CPU ms per step (``time.process_time``), wall ms per step, system (kernel) ms per step and minor page faults per
step (``getrusage``; the peer comparison's ``time_alternating``): the ``foreach`` path allocates a parameter-sized
``sqrt`` temporary per parameter, which a fresh allocation faults in again. ``--kind`` times one kind alone (to
pair whole processes with an outside timer).

Usage: ``python benchmarks/bench_optimizer_step.py [--model vit_small_patch16] [--prototypes 65536] [--steps 5]
[--repeats 4] [--threads 1] [--kind both|fused|foreach]``.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16", help="registered backbone of the DINO student")
    parser.add_argument("--prototypes", type=int, default=65536, help="DINO/iBOT head prototypes")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed block")
    parser.add_argument("--repeats", type=int, default=4, help="timed blocks per kind (alternating)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per kind first (moment buffers exist)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--kind", choices=["both", "fused", "foreach"], default="both")
    args = parser.parse_args(argv)

    import torch

    from medfoundry.methods.dino.method import DINOMethod
    from medfoundry.train.optim import apply_schedules, build_optimizer
    from medfoundry_cli.bench.peer_compare import Side, time_alternating
    from medfoundry_cli.bench.results import describe_machine
    from medfoundry_cli.bench.step import StepSpec, dino_run_config

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(describe_machine(device), flush=True)
    cfg = dino_run_config(StepSpec(model=args.model, global_size=112, local_size=48, n_local=4,
                                   head_dim=args.prototypes))
    kinds = ["fused", "foreach"] if args.kind == "both" else [args.kind]
    sides = []
    for kind in kinds:
        torch.manual_seed(0)
        method = DINOMethod(cfg.model, cfg.dino, cfg.train.steps)
        opt = build_optimizer(method, cfg.optim, method.student["backbone"].depth, fused=kind == "fused")
        apply_schedules(opt, cfg.optim, cfg.optim.warmup_steps, cfg.train.steps)
        for p in method.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
        n_params = sum(p.numel() for p in method.parameters() if p.requires_grad)
        sides.append((Side(kind, params=n_params), lambda _step, opt=opt: opt.step()))
    time_alternating(sides, device, args.repeats, args.steps, args.warmup)
    print(f"AdamW step over {n_params / 1e6:.2f} M trainable parameters ({args.model}, {args.prototypes} prototypes), "
          f"{torch.get_num_threads()} torch thread(s), {args.repeats} blocks of {args.steps} steps per kind")
    head = f"{'kind':8s} {'CPU ms/step (median; blocks)':30s} {'wall ms/step':13s} {'sys ms/step':12s}"
    print(head + " minor faults/step")
    for side, _ in sides:
        blocks = f"{1e3 * min(side.cpu_s):.1f}-{1e3 * max(side.cpu_s):.1f}"
        print(f"{side.name:8s} {1e3 * side.cpu_median:8.1f} ({blocks}){'':12s} {1e3 * side.wall_median:8.1f}"
              f"{'':5s} {1e3 * side.median_of('sys_s'):8.1f}{'':4s} {side.median_of('minflt'):,.0f}")
    if len(sides) == 2:
        print(f"CPU-time ratio fused / foreach: {sides[0][0].cpu_median / sides[1][0].cpu_median:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
