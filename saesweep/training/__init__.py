"""The training loop and what it needs.

- `loop`: one loop for every architecture and for a group of SAEs on one stream;
- `member`: one SAE of a group, with its optimizer, counters, metrics and run dir;
- `checkpoint`: checkpoints and stop signals (preemption-safe resume);
- `optim`: optimizers and learning-rate schedules;
- `distributed`: data-parallel ranks (`training.distributed=ddp`) and device choice;
- `metrics_log`: metrics.jsonl and W&B;
- `allocator`: keep freed memory in the process between steps.
"""
