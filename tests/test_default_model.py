"""The embedded default model (SmolLM2-135M-Instruct from its GGUF) over a real 2-rank mpirun."""

from conftest import run_pipeline


def test_default_model_knows_the_capital_of_france():
    proc = run_pipeline(2, "--prompt", "What is the capital of France?", "--max-tokens", "24",
                        "--temp", "0", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert proc.stdout.endswith("\n") and proc.stdout.count("\n") == 1  # only the completion
    for figure in ("prompt:", "tok/s", "generation:", "time to first token", "rank 1 ("):
        assert figure in proc.stderr
    assert "llama 30 layers" in proc.stderr and "BLAS" in proc.stderr
