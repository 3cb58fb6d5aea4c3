"""`shard_for_inference` (serving's tensor parallelism on plain tensors) over 2 real gloo
processes: the split model's logits equal the whole model's, in both of the model's lineages."""

import torch
import torch.multiprocessing as mp

from supercluster.model.config import ModelConfig

SHAPES = {
    "llama (GQA, SwiGLU, RoPE)": dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn_hidden=96, vocab_size=96),
    "gpt (biases, LayerNorm, GELU, learned positions, tied head, odd vocabulary)": dict(
        layers=2, hidden=64, heads=4, vocab_size=97, norm="layernorm", mlp="gelu", position="learned", bias=True,
        tie_embeddings=True),
}


def _rank(rank: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        for shape in SHAPES.values():
            _compare(rank, shape)
    finally:
        dist.destroy_process_group()


def _compare(rank: int, shape: dict) -> None:
    from supercluster.model.transformer import Transformer
    from supercluster.parallel.tensor import shard_for_inference

    model = Transformer(ModelConfig(max_seq_len=32, **shape)).eval()
    model.init_weights(seed=0)
    with torch.no_grad():
        for p in model.parameters():  # biases and norms away from their zero/one init, so a bias added twice shows
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    tokens = torch.randint(0, shape["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = model(tokens)
        shard_for_inference(model, rank, 2)
        assert model.layers["0"].attention.wk.weight.shape[0] == model.cfg.kv_heads // 2 * model.cfg.head_dim
        split = model(tokens)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5, msg=lambda m: f"{shape}: {m}")


def test_a_model_split_over_two_processes_gives_the_whole_models_logits():
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    mp.start_processes(_rank, args=(store.port,), nprocs=2, join=True, start_method="spawn")
