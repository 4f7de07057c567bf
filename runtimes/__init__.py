"""edge_recover.runtimes: run and profile packages on ONNX Runtime execution providers.

    package folder ─► open_package (checks) ─► OrtCausalLM (provider adapter, KV cache) ─► generate_ids / Generator
                                              └► profile_packages (worker per package, interleaved) ─► report folder

Modules: providers (adapters as data), package (contract checks, graph stats), session (one step, IO binding),
sampling, generate (the loop), chat (chat templates), genai (onnxruntime-genai path), device (device info,
read bandwidth), profiler + worker (measurements), report (report.json/md/plots), cli (`run`, `profile`).
Nothing is imported here, so `import edge_recover.runtimes` stays cheap.
"""
