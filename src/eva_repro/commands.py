"""The `eva-repro` subcommands: name -> (the module that defines `configure_parser(parser)` and
`run(args)`, a one-line help). `cli` builds the command line from it; `demo` runs stages by it."""

COMMANDS = {
    "extract": ("eva_repro.data.extract", "images -> frozen EVA-CLIP / CLIP patch embeddings -> shards"),
    "synth": ("eva_repro.data.synth", "write synthetic shards with a known target function"),
    "train": ("eva_repro.training.train", "train the DiT on shards (single process, DDP or FSDP2)"),
    "evaluate": ("eva_repro.evaluation.evaluate", "evaluate a trained model on held-out shards"),
    "sample": ("eva_repro.evaluation.generate",
               "generate EVA embeddings for CLIP embeddings (shards in/out)"),
    "check": ("eva_repro.testbed.command", "judge a DiT: interface, learning, controls -> a report card"),
    "zoo": ("eva_repro.testbed.zoo", "run `check` on DiTs with planted bugs: the table of what it catches"),
    "demo": ("eva_repro.demo", "images -> shards -> model -> report, offline"),
    "bench": ("eva_repro.bench", "run benchmarks and write JSON results"),
}
