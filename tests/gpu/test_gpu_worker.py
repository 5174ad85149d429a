"""The worker's pipeline on a real GPU (skipped without CUDA)."""

import io

import pytest
import torch
from PIL import Image

from client.protocol import GenerationRequest
from celery_bridge.config import WorkerConfig
from celery_bridge.pipeline import PipelineRunner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("options", [{}, {"attention_slicing": True, "vae_tiling": True}, {"cpu_offload": True}])
def test_fp16_render_on_cuda(tmp_path, options):
    runner = PipelineRunner(WorkerConfig(device="auto", fp16=True, model_cache_dir=str(tmp_path), **options))
    assert runner.device == "cuda" and runner.dtype == torch.float16
    request = GenerationRequest("a red fox on a gpu", width=128, height=128, seed=1)
    png = runner.render(request)
    assert Image.open(io.BytesIO(png)).size == (128, 128)
    assert runner.render(request) == png, "the same request gives the same bytes on the GPU too"
