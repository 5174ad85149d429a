"""The demo model's world (celery_bridge/demo_world.py): its grammar, its renderer and the checker
that reads images back; and the training script, run on a toy budget (deterministic, and it saves a
pipeline the worker's loader serves)."""

import random

import numpy as np
import pytest
from PIL import Image

from celery_bridge import demo_world
from celery_bridge.demo_world import COLOURS, POSITIONS, SHAPES, SIZES, Scene, Thing


def test_every_prompt_of_the_grammar_parses_back_to_its_scene():
    rng = random.Random(3)
    for _ in range(300):
        drawn = demo_world.training_scene(rng)
        assert demo_world.parse(drawn.prompt()) == drawn
        asked = demo_world.parse(demo_world.training_prompt(drawn, rng, omit=0.5))
        assert asked is not None and len(asked.things) == len(drawn.things)
        for want, got in zip(drawn.things, asked.things):  # what a prompt names is what was drawn
            assert all(getattr(got, part) in (None, getattr(want, part)) for part in ("colour", "shape", "position", "size"))


@pytest.mark.parametrize("text", ["a red fox in the snow", "a circle and a square and a cross", "a pink circle", ""])
def test_text_outside_the_grammar_is_not_a_scene(text):
    assert demo_world.parse(text) is None


def test_the_grammar_has_what_the_issue_asks_for():
    assert len(COLOURS) >= 6 and len(SHAPES) >= 4 and len(POSITIONS) == 5 and len(SIZES) == 2
    scene = demo_world.parse("a small red circle on the left and a blue square on a yellow background")
    assert scene == Scene((Thing("red", "circle", "left", "small"), Thing("blue", "square", None, None)), "yellow")
    completed = demo_world.complete(scene, random.Random(0))
    assert demo_world.full(completed) and completed.things[1].position == "right"  # two objects: opposite sides


@pytest.mark.parametrize("side", [64, 128])
def test_the_checker_reads_what_the_renderer_drew(side):
    scenes = demo_world.evaluation_scenes(120)
    rng = random.Random(1)
    images = [demo_world.draw(scene, side, rng) for scene in scenes]
    assert demo_world.score(scenes, images) == {"colour": 1.0, "background": 1.0, "position": 1.0, "shape": 1.0,
                                                "size": 1.0}


def test_the_checker_tells_a_wrong_image_from_a_right_one():
    asked = Scene((Thing("red", "circle", "left", "large"),), "white")
    wrong = Scene((Thing("blue", "triangle", "right", "small"),), "green")
    scores = demo_world.score([asked], [demo_world.draw(wrong)])
    assert scores == {"colour": 0.0, "background": 0.0, "position": 0.0, "shape": 0.0, "size": 0.0}
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert demo_world.score([asked], [noise])["shape"] in (0.0, 1.0)  # reads noise without failing


def test_held_out_combinations_are_never_trained_on_and_are_what_is_evaluated():
    rng = random.Random(5)
    for _ in range(3000):
        scene = demo_world.training_scene(rng)
        if len(scene.things) == 1:
            thing = scene.things[0]
            assert not demo_world.held_out(thing.colour, thing.shape, thing.position, scene.background)
    evaluation = demo_world.evaluation_scenes(200)
    assert all(demo_world.held_out(s.things[0].colour, s.things[0].shape, s.things[0].position, s.background)
               for s in evaluation)
    assert len({s.prompt() for s in evaluation}) >= 150  # many distinct held-out prompts


def test_the_demo_tokenizer_has_one_token_per_word_of_the_grammar(tmp_path):
    from transformers import CLIPTokenizer

    from celery_bridge.demo_model import write_demo_tokenizer

    folder = write_demo_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    prompt = "a small purple triangle at the bottom and an orange cross at the top on a yellow background"
    assert len(tokenizer(prompt).input_ids) == len(prompt.split()) + 2  # + start and end
    assert len(tokenizer("a red fox in the snow ❄").input_ids) > 8  # anything else still tokenizes


def test_training_is_deterministic_and_saves_a_pipeline_the_worker_serves(tmp_path):
    from celery_bridge.config import WorkerConfig
    from celery_bridge.demo_model import TrainConfig, train
    from celery_bridge.pipeline import PipelineRunner
    from client.protocol import GenerationRequest

    budget = TrainConfig(vae_steps=2, vae_batch=4, pool=16, unet_steps=3, unet_batch=4)
    first, second = train(tmp_path / "a", budget), train(tmp_path / "b", budget)
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/tokenizer.json"):
        assert (first / part).read_bytes() == (second / part).read_bytes(), part
    losses = (first / "loss.jsonl").read_text().splitlines()
    assert any('"stage": "unet"' in line for line in losses) and '"stage": "done"' in losses[-1]
    runner = PipelineRunner(WorkerConfig(device="cpu", model=str(first)))
    for side in (64, 128):
        png = runner.render(GenerationRequest("a red circle", width=side, height=side, steps=2, seed=1))
        import io

        assert Image.open(io.BytesIO(png)).size == (side, side)


def test_the_verdict_says_whether_an_image_matches_its_prompt(tmp_path, capsys):
    prompt = "a large red circle in the centre on a white background"
    right, wrong = tmp_path / "right.png", tmp_path / "wrong.png"
    demo_world.draw(demo_world.parse(prompt)).save(right)
    demo_world.draw(Scene((Thing("blue", "square", "left", "small"),), "white")).save(wrong)
    assert demo_world.main([prompt, str(right)]) == 0
    assert "it matches the prompt" in capsys.readouterr().out
    assert demo_world.main([prompt, str(wrong)]) == 1
    words = capsys.readouterr().out
    assert "colour blue (asked red)" in words and "shape square (asked circle)" in words
    assert demo_world.main(["a red fox in the snow", str(right)]) == 1
    assert "not of the demo model's grammar" in capsys.readouterr().out


def test_the_vae_loss_weighs_up_exactly_the_pixels_near_an_edge():
    import numpy as np
    import torch

    from celery_bridge.demo_model import _edges

    image = demo_world.draw(Scene((Thing("red", "square", "centre", "large"),), "white"))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
    edges = _edges(pixels)[0, 0].numpy().astype(bool)
    flat = np.zeros_like(edges)
    flat[2:10, 2:10] = flat[30:34, 30:34] = True  # well inside the background and inside the square
    assert edges.any() and not (edges & flat).any()
    rows = np.nonzero(edges[:, 32])[0]  # down the middle column: the square's top and bottom edges
    assert rows.min() < 20 and rows.max() > 44 and not edges[26:38, 32].any()


def test_the_examples_a_newcomer_meets_are_prompts_of_the_grammar():
    """The boot client's help, the page's placeholder and the README's demo block show prompts the
    demo model knows, not ones it would draw at random."""
    import re
    import subprocess
    import sys

    from tests.services import REPO as repo
    help_text = subprocess.run([sys.executable, str(repo / "client" / "boot.py"), "--help"], capture_output=True,
                               text=True, timeout=60, check=True).stdout
    shown = re.findall(r'boot\.py "([^"]+)"', help_text)
    shown += re.findall(r'id="prompt"[^>]*placeholder="([^"]+)"', (repo / "serve_app" / "web" / "index.html").read_text())
    readme = (repo / "README.md").read_text()
    block = readme[readme.index("## The demo model"):]
    shown += block[block.index("```\n") + 4:block.index("\n```", block.index("```\n"))].splitlines()
    assert len(shown) >= 5, shown
    assert all(demo_world.parse(prompt) is not None for prompt in shown), shown
