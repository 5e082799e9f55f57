"""`chat-vector`: restore instruction following after continued pre-training by adding the chat
model's residual over its base (Huang et al. 2024, "Chat Vector"; Jindal et al. 2024):

    θ_out = θ_cpt + r · (θ_chat − θ_base)

in float32, tensor by tensor, written in the continued-pre-training model's dtype. With
`skip_embed` the embedding and lm_head rows keep θ_cpt (for a CPT model whose vocabulary grew).
"""

from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from counterpoint.training.checkpoint import write_provenance
from counterpoint.training.merge.base import LazyModel
from counterpoint.training.merge.tensorwise import ShardWriter

EMBEDDINGS = ("embed_tokens", "lm_head")


def chat_vector(cpt: Path, chat: Path, base: Path, out: Path, ratio: float = 1.0, skip_embed: bool = False,
                show_progress: bool = True) -> Path:
    cpt_model, chat_model, base_model = LazyModel(cpt), LazyModel(chat), LazyModel(base)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out)
    for name in tqdm(cpt_model.names(), desc="chat vector", disable=not show_progress):
        theta = cpt_model.get(name)
        if skip_embed and any(part in name for part in EMBEDDINGS):
            writer.add(name, theta)
            continue
        residual = _residual(name, chat_model, base_model, theta.shape)
        writer.add(name, (theta.float() + ratio * residual).to(theta.dtype))
    writer.close()
    AutoConfig.from_pretrained(cpt).save_pretrained(out)
    AutoTokenizer.from_pretrained(cpt).save_pretrained(out)
    if (cpt / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(cpt).save_pretrained(out)
    write_provenance(out, "chat-vector", [cpt, chat, base], ratio=ratio, skip_embed=skip_embed)
    return out


def _residual(name: str, chat: LazyModel, base: LazyModel, shape: torch.Size) -> torch.Tensor:
    for model in (chat, base):
        if name not in model.where:
            raise ValueError(f"{name}: {model.path} has no such tensor")
    chat_t, base_t = chat.get(name), base.get(name)
    if chat_t.shape != shape or base_t.shape != shape:
        hint = " (vocabularies differ: --skip-embed keeps the CPT model's rows)" if any(
            part in name for part in EMBEDDINGS) else ""
        raise ValueError(f"{name}: shapes differ: cpt {tuple(shape)}, chat {tuple(chat_t.shape)}, base "
                         f"{tuple(base_t.shape)}{hint}")
    return chat_t.float() - base_t.float()
