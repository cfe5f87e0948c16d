"""The method to the letter: conditions, schedules, rollouts, per-step backward, the teacher and its EMA."""

import argparse

import pytest
import torch
from PIL import Image

from dopsd_training import distillation_loss, dopsd_step, ema_update, rollout_sigmas
from pipeline_dopsd import Flux2KleinFamily, QwenVLTeacherEncoder, ZImageFamily, euler_step, x0_from_velocity
from train_dopsd_lora import LoraAdaptation

PROMPTS = ["a photo of [V] toy on a table", "a red apple"]


def test_zimage_student_condition_is_the_pipelines(zimage):
    family = ZImageFamily(zimage)
    ours = family.encode_student(PROMPTS)
    theirs, _ = zimage.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False)
    assert [c["caption"].shape for c in ours] == [t.shape for t in theirs]
    for c, t in zip(ours, theirs):
        torch.testing.assert_close(c["caption"], t, rtol=0, atol=0)
    # Padding is removed: the condition is as long as the chat-templated prompt, not 512.
    assert ours[0]["caption"].shape[0] < 512


def test_klein_student_condition_is_the_pipelines(klein):
    family = Flux2KleinFamily(klein)
    ours = family.collate(family.encode_student(PROMPTS), "cpu")
    embeds, text_ids = klein.encode_prompt(list(PROMPTS), device="cpu")
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["text_ids"], text_ids, rtol=0, atol=0)
    assert embeds.shape[1] == 512


def test_zimage_schedule_is_the_reference_grid_at_real_size(zimage):
    family = ZImageFamily(zimage)
    sigmas = family.sigmas(8, 1024, 1024)
    # The stock 8-step schedule (shift 3), and its every-other points = the reference's 4-step training grid.
    torch.testing.assert_close(rollout_sigmas(sigmas, 4), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]), atol=1e-6, rtol=0)
    assert torch.equal(rollout_sigmas(sigmas, 8), sigmas)
    # States spread evenly: the nearest points of the 8-step schedule to 0, 8/3 and 16/3 steps, then sigma 0.
    assert torch.equal(rollout_sigmas(sigmas, 3), sigmas[[0, 3, 5, 8]])
    with pytest.raises(ValueError, match="rollout_steps"):
        rollout_sigmas(sigmas, 9)


def test_klein_schedule_is_the_inference_schedule(klein):
    family = Flux2KleinFamily(klein)
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    sigmas = family.sigmas(4, 256, 256)  # tiny VAE: 256 px is a 64x64-token image, like 1024 px on the real model
    # linspace(1, 1/N, N) time-shifted with the empirical mu of a 64x64-token image: not the reference's grid (P8).
    mu = compute_empirical_mu(4096, 4)
    expected = torch.tensor([1.0, 0.75, 0.5, 0.25]).double()
    expected = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / expected - 1))
    torch.testing.assert_close(sigmas[:-1].double(), expected, atol=1e-5, rtol=0)
    assert sigmas[-1] == 0


def _noise(family, seed=0, size=64):
    return family.initial_noise(1, size, size, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family_name", ["zimage", "klein"])
def test_full_rollout_reproduces_the_stock_pipeline(family_name, request):
    pipe = request.getfixturevalue(family_name)
    family = (ZImageFamily if family_name == "zimage" else Flux2KleinFamily)(pipe)
    steps = family.native_steps
    noise = _noise(family)
    condition = family.collate(family.encode_student(PROMPTS[:1]), "cpu")
    sigmas = rollout_sigmas(family.sigmas(steps, 64, 64), steps)
    with torch.no_grad():
        ours = family.decode(family.sample(pipe.transformer, condition, noise, sigmas), output_type="latent")
    kwargs = {"guidance_scale": 0.0} if family_name == "zimage" else {}
    # Both stock pipelines take the family's state layout as `latents` (klein packs it itself).
    stock = pipe(prompt=PROMPTS[0], num_inference_steps=steps, height=64, width=64, latents=noise, output_type="latent", **kwargs).images
    assert (ours - stock).abs().max() <= 1e-5


def test_klein_teacher_prediction_is_the_editing_path(klein):
    family = Flux2KleinFamily(klein)
    target = Image.new("RGB", (64, 64), (200, 40, 40))
    target.paste((20, 20, 220), (16, 16, 48, 48))
    teacher = family.collate(family.encode_teacher(PROMPTS[:1], [target]), "cpu")
    assert teacher["reference_ids"][0, :, 0].unique().tolist() == [10]
    noise = _noise(family)
    sigmas = family.sigmas(1, 64, 64)
    with torch.no_grad():
        ours = euler_step(noise, sigmas[0], sigmas[1], family.velocity(klein.transformer, noise, sigmas[0], teacher))
    stock = klein(prompt=family.teacher_prompt(PROMPTS[0]), image=target, num_inference_steps=1, height=64, width=64,
                  latents=noise, output_type="latent").images
    assert (family.decode(ours, output_type="latent") - stock).abs().max() <= 1e-5
    # The reference image changes the prediction (it is not ignored).
    student = family.collate(family.encode_student(PROMPTS[:1]), "cpu")
    with torch.no_grad():
        assert (family.velocity(klein.transformer, noise, sigmas[0], student) - family.velocity(klein.transformer, noise, sigmas[0], teacher)).abs().max() > 1e-6


def test_zimage_teacher_encoder_swaps_the_language_model(zimage, tiny_models):
    family = ZImageFamily(zimage)
    # The tiny VLM was saved with the tiny text encoder's weights: move them, so that only the swap makes them equal.
    with torch.no_grad():
        for p in zimage.text_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    family.load_teacher_encoder(str(tiny_models / "qwen3-vl-teacher"), 32 * 32, 64 * 64)
    lm = family.teacher_encoder.model.model.language_model.state_dict()
    for key, value in zimage.text_encoder.state_dict().items():
        assert torch.equal(lm[key], value), key
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    caption = family.encode_teacher([PROMPTS[0]], [image])[0]["caption"]
    student = family.encode_student([PROMPTS[0]])[0]["caption"]
    assert caption.shape[1] == student.shape[1] and caption.shape[0] > student.shape[0]  # image tokens added
    # A different image gives a different teacher context.
    other = family.encode_teacher([PROMPTS[0]], [Image.new("RGB", (64, 64), (250, 250, 0))])[0]["caption"]
    assert (other - caption).abs().max() > 0


def test_zimage_teacher_context_is_the_vlms_second_to_last_layer_of_image_then_prompt(zimage, tiny_models):
    """The reference's teacher context written out: one user turn [image, prompt] with the generation prompt,
    hidden_states[-2] of the VLM (the layer Z-Image's own text path uses), padding removed."""
    family = ZImageFamily(zimage)
    encoder = family.load_teacher_encoder(str(tiny_models / "qwen3-vl-teacher"), 32 * 32, 64 * 64)
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    image.paste((240, 20, 20), (0, 0, 32, 32))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPTS[0]}]}]
    inputs = encoder.processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,
                                                   return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model(**inputs, output_hidden_states=True).hidden_states
    keep = inputs["attention_mask"][0].bool()
    ours = family.encode_teacher([PROMPTS[0]], [image])[0]["caption"]
    torch.testing.assert_close(ours, hidden[-2][0][keep], rtol=0, atol=0)
    assert not torch.allclose(hidden[-1][0][keep], hidden[-2][0][keep])  # the last layer would be another context
    # The image's tokens come before the prompt's.
    ids = inputs["input_ids"][0].tolist()
    first_prompt_token = encoder.processor.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"][0]
    assert ids.index(encoder.model.config.image_token_id) < ids.index(first_prompt_token)


def test_klein_teacher_prompt_is_the_prompt_then_the_reference_suffix(klein):
    family = Flux2KleinFamily(klein)
    suffix = "Make the main subject (facial/ip details), background, and overall composition consistent with the reference image."
    assert family.teacher_prompt(PROMPTS[0]) == f"{PROMPTS[0]} {suffix}"
    family.setup_teacher(prompt_suffix="keep it")
    assert family.teacher_prompt(PROMPTS[0]) == f"{PROMPTS[0]} keep it"


def test_teacher_encoder_refuses_a_mismatched_vlm(tiny_models, klein):
    # klein's text encoder has 28 layers, the tiny VLM's language model 2: every extra key is a mismatch.
    with pytest.raises(ValueError, match="does not match the text encoder"):
        QwenVLTeacherEncoder.from_pretrained(str(tiny_models / "qwen3-vl-teacher"), klein.text_encoder.model, 1024, 4096)


def test_teacher_context_over_the_caption_limit_fails_clearly(zimage, tiny_models):
    family = ZImageFamily(zimage)
    family.load_teacher_encoder(str(tiny_models / "qwen3-vl-teacher"), 256 * 256, 1024 * 1024)
    # Tiny axes_lens[0] = 1024, so a 1024x1024 view (1024 image tokens) cannot fit.
    with pytest.raises(ValueError, match="teacher_max_pixels"):
        family.encode_teacher([PROMPTS[0]], [Image.new("RGB", (1024, 1024))])


# -- the D-OPSD step --------------------------------------------------------------------------------------------------


def _lora_setup(pipe, family_cls, ema_decay=0.5, gradient_checkpointing=False, perturb=True):
    family = family_cls(pipe)
    args = argparse.Namespace(rank=4, lora_alpha=4, lora_dropout=0.0, lora_layers=None, lora_preset="all", method="dopsd",
                              ema_decay=ema_decay, learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0,
                              adam_epsilon=1e-8, use_8bit_adam=False)
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    adaptation = LoraAdaptation(args, family, transformer, accelerator=None, weight_dtype=torch.float32)
    if perturb:
        with torch.no_grad():  # a non-zero student so that gradients flow into both LoRA factors
            for p in adaptation.student_params:
                p.add_(torch.randn_like(p) * 0.05)
    return family, adaptation


def _one_step(family, adaptation, backward, image):
    student_condition = family.collate(family.encode_student(PROMPTS[:1]), "cpu")
    teacher_condition = family.collate(family.encode_teacher(PROMPTS[:1], [image]), "cpu")
    sigmas = rollout_sigmas(family.sigmas(family.native_steps, 64, 64), 4)
    with adaptation.student():
        return dopsd_step(
            lambda x, s: adaptation.student_velocity(adaptation.transformer, x, s, student_condition),
            lambda x, s: adaptation.teacher_velocity(x, s, teacher_condition),
            _noise(family), sigmas, "x0", backward,
        )


@pytest.mark.parametrize("loss_space", ["x0", "velocity"])
def test_the_students_velocity_drives_the_rollout_and_both_see_its_states(loss_space):
    """On-policy: every state is the previous one advanced by an Euler step with the student's velocity; the teacher
    predicts at that same state and sigma, without a graph; each state's loss is the asked-for MSE."""
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    calls = {"student": [], "teacher": []}

    def student(x, sigma):
        assert torch.is_grad_enabled()
        calls["student"].append((x.clone(), sigma))
        return 0.5 * x + 1.0

    def teacher(x, sigma):
        assert not torch.is_grad_enabled()
        calls["teacher"].append((x.clone(), sigma))
        return -x

    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    losses = dopsd_step(student, teacher, noise, sigmas, loss_space)
    x = noise
    for k in range(4):
        for role in ("student", "teacher"):
            state, sigma = calls[role][k]
            torch.testing.assert_close(state, x, rtol=0, atol=0)
            assert sigma == sigmas[k]
        v_student, v_teacher = 0.5 * x + 1.0, -x
        weight = sigmas[k] ** 2 if loss_space == "x0" else 1.0
        torch.testing.assert_close(losses[k], weight * (v_student - v_teacher).square().mean())
        x = x + (sigmas[k + 1] - sigmas[k]) * v_student
    assert len(calls["student"]) == len(calls["teacher"]) == 4


def test_the_off_policy_ablation_trains_on_the_noised_ground_truth():
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    generator = torch.Generator().manual_seed(2)
    noise, x0 = torch.randn(1, 2, 4, 4, generator=generator), torch.randn(1, 2, 4, 4, generator=generator)
    states = []
    dopsd_step(lambda x, sigma: states.append(x.clone()) or x, lambda x, sigma: -x, noise, sigmas, "x0", off_policy_x0=x0)
    for state, sigma in zip(states, sigmas):
        torch.testing.assert_close(state, (1 - sigma) * x0 + sigma * noise, rtol=0, atol=0)


def test_flow_conventions_recover_the_clean_sample_and_reach_it():
    """x = (1 - sigma) x0 + sigma noise and v = noise - x0: x0 = x - sigma v, and one Euler step to sigma 0 lands on x0.
    (The loss alone cannot tell the sign of x0_from_velocity: both sides shift alike. The rollout strip can.)"""
    generator = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    sigma = torch.tensor(0.75)
    x, v = (1 - sigma) * x0 + sigma * noise, noise - x0
    torch.testing.assert_close(x0_from_velocity(x, sigma, v), x0)
    torch.testing.assert_close(euler_step(x, sigma, torch.tensor(0.0), v), x0)
    torch.testing.assert_close(euler_step(x, sigma, torch.tensor(1.0), v), noise)


def test_x0_loss_is_the_velocity_loss_weighted_by_sigma_squared():
    generator = torch.Generator().manual_seed(1)
    x, v_student, v_teacher = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(3))
    sigma = torch.tensor(0.5)
    velocity = distillation_loss(x, sigma, v_student, v_teacher, "velocity")
    torch.testing.assert_close(velocity, (v_student - v_teacher).square().mean())
    torch.testing.assert_close(distillation_loss(x, sigma, v_student, v_teacher, "x0"), sigma**2 * velocity)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_per_step_backward_equals_one_backward_and_teacher_gets_no_gradient(klein, gradient_checkpointing):
    family, adaptation = _lora_setup(klein, Flux2KleinFamily, gradient_checkpointing=gradient_checkpointing)
    image = Image.new("RGB", (64, 64), (120, 30, 200))
    teacher_before = [p.detach().clone() for p in adaptation.teacher_params]

    _one_step(family, adaptation, lambda loss: (loss / 4).backward(), image)
    per_step = [p.grad.clone() for p in adaptation.student_params]
    assert all(p.grad is None for p in adaptation.teacher_params)
    assert any(g.abs().max() > 0 for g in per_step)
    for p in adaptation.student_params:
        p.grad = None

    losses = []
    _one_step(family, adaptation, losses.append, image)
    torch.stack(losses).mean().backward()
    for g, p in zip(per_step, adaptation.student_params):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-8)
    assert all(p.grad is None for p in adaptation.teacher_params)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, adaptation.teacher_params))


def test_gradient_checkpointing_gives_the_same_gradients(zimage, tiny_models):
    grads = []
    for checkpointing in (False, True):
        pipe = __import__("conftest").load_stock(tiny_models / "z-image")
        torch.manual_seed(0)
        family, adaptation = _lora_setup(pipe, ZImageFamily, gradient_checkpointing=checkpointing)
        family.load_teacher_encoder(str(tiny_models / "qwen3-vl-teacher"), 32 * 32, 64 * 64)
        _one_step(family, adaptation, lambda loss: (loss / 4).backward(), Image.new("RGB", (64, 64), (0, 90, 90)))
        grads.append([p.grad.clone() for p in adaptation.student_params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_teacher_starts_equal_to_student_and_a_same_context_teacher_teaches_nothing(zimage):
    family, adaptation = _lora_setup(zimage, ZImageFamily, perturb=False)
    # A copy, not a second random draw: lora_A is random at init (B is zero), so only a copy makes them equal.
    assert len(adaptation.teacher_params) == len(adaptation.student_params) > 0
    for t, s in zip(adaptation.teacher_params, adaptation.student_params):
        assert torch.equal(t, s) and t.data_ptr() != s.data_ptr()
    # The reference's (and diffusers' examples') "gaussian" init: lora_A ~ N(0, 1/rank), lora_B = 0.
    named = dict(adaptation.transformer.named_parameters())
    a = torch.cat([p.flatten() for n, p in named.items() if ".lora_A.student." in n])
    assert a.std().item() == pytest.approx(1 / 4, rel=0.1)
    assert all(p.abs().max() == 0 for n, p in named.items() if ".lora_B.student." in n)
    with torch.no_grad():  # a trained-looking student, and the teacher still equal to it
        for t, s in zip(adaptation.teacher_params, adaptation.student_params):
            s.add_(torch.randn_like(s) * 0.05)
            t.copy_(s)
    condition = family.collate(family.encode_student(PROMPTS[:1]), "cpu")
    sigmas = rollout_sigmas(family.sigmas(8, 64, 64), 4)
    with adaptation.student():
        losses = dopsd_step(lambda x, s: adaptation.student_velocity(adaptation.transformer, x, s, condition),
                            lambda x, s: adaptation.teacher_velocity(x, s, condition), _noise(family), sigmas, "x0",
                            lambda loss: (loss / 4).backward())
    assert all(loss.item() == 0.0 for loss in losses)
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in adaptation.student_params)


def test_ema_arithmetic():
    teacher = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    student = [torch.tensor([3.0, 6.0]), torch.tensor([[10.0]])]
    ema_update(teacher, student, 0.75)
    torch.testing.assert_close(teacher[0], torch.tensor([1.5, 3.0]))
    torch.testing.assert_close(teacher[1], torch.tensor([[2.5]]))
    ema_update(teacher, student, 1.0)  # a frozen teacher
    torch.testing.assert_close(teacher[0], torch.tensor([1.5, 3.0]))
    ema_update(teacher, student, 0.0)  # a live copy
    torch.testing.assert_close(teacher[0], student[0])
    # fp32 shadow of a bf16 student: the update is not rounded away.
    shadow = [torch.zeros(1)]
    for _ in range(100):
        ema_update(shadow, [torch.ones(1, dtype=torch.bfloat16)], 0.9999)
    torch.testing.assert_close(shadow[0], torch.tensor([1 - 0.9999**100]), rtol=1e-5, atol=0)


def test_adapter_switching_runs_the_adapter_peft_would(klein):
    """LoraAdaptation switches adapters without peft's set_adapter (too slow per state): each role must still run
    exactly its own adapter, and only the student may ever require gradients."""
    from train_dopsd_lora import STUDENT, TEACHER

    family, adaptation = _lora_setup(klein, Flux2KleinFamily)
    with torch.no_grad():  # a teacher different from the student
        for p in adaptation.teacher_params:
            p.add_(torch.randn_like(p) * 0.05)
    condition = family.collate(family.encode_student(PROMPTS[:1]), "cpu")
    x, sigma = _noise(family), torch.tensor(0.75)
    transformer = adaptation.transformer

    def by_peft(adapter):
        transformer.set_adapter(adapter)
        with torch.no_grad():
            return family.velocity(transformer, x, sigma, condition)

    expected = {role: by_peft(role) for role in (STUDENT, TEACHER)}
    assert not torch.equal(expected[STUDENT], expected[TEACHER])
    adaptation._activate(STUDENT)  # peft left the teacher active: start from the training state
    adaptation._freeze_teacher()
    for _ in range(2):  # there and back twice
        with adaptation.student(), torch.no_grad():
            torch.testing.assert_close(adaptation.student_velocity(transformer, x, sigma, condition), expected[STUDENT], rtol=0, atol=0)
        torch.testing.assert_close(adaptation.teacher_velocity(x, sigma, condition), expected[TEACHER], rtol=0, atol=0)
    with adaptation.base(), torch.no_grad():
        base = family.velocity(transformer, x, sigma, condition)
    assert not torch.equal(base, expected[STUDENT])
    assert all(p.requires_grad for p in adaptation.student_params)
    assert not any(p.requires_grad for p in adaptation.teacher_params)
    with adaptation.student():
        student = adaptation.student_velocity(transformer, x, sigma, condition)
    torch.testing.assert_close(student, expected[STUDENT], rtol=0, atol=0)  # and after base() too
    student.square().mean().backward()
    assert all(p.grad is not None for p in adaptation.student_params)
    assert all(p.grad is None for p in adaptation.teacher_params)


def test_lora_factors_are_fp32_on_a_bf16_base(tiny_models):
    """The EMA teacher keeps its small updates only in fp32 (a bf16 adapter rounds most of them away)."""
    from diffusers import Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel.from_pretrained(str(tiny_models / "flux2-klein" / "transformer"), dtype=torch.bfloat16)
    pipe = __import__("conftest").load_stock(tiny_models / "flux2-klein")
    pipe.transformer = transformer
    _, adaptation = _lora_setup(pipe, Flux2KleinFamily, perturb=False)
    assert all(p.dtype == torch.float32 for p in adaptation.student_params + adaptation.teacher_params)
    assert next(p for n, p in transformer.named_parameters() if "lora" not in n).dtype == torch.bfloat16


def test_lora_teacher_ema_follows_the_student(zimage):
    family, adaptation = _lora_setup(zimage, ZImageFamily, ema_decay=0.9)
    before = [t.detach().clone() for t in adaptation.teacher_params]
    adaptation.update_teacher()
    for b, t, s in zip(before, adaptation.teacher_params, adaptation.student_params):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s.detach())
    assert all(t.dtype == torch.float32 for t in adaptation.teacher_params)
    assert not any(t.requires_grad for t in adaptation.teacher_params)


def test_the_returned_losses_hold_no_state_sized_buffers(klein):
    """dopsd_step keeps one loss per state until the optimizer step: each must be a scalar of its own, not a view of
    the state-sized buffer mse_loss computed it in (it is one on a CPU), or memory would grow with the states."""
    family, adaptation = _lora_setup(klein, Flux2KleinFamily)
    losses = _one_step(family, adaptation, lambda loss: (loss / 4).backward(), Image.new("RGB", (64, 64), (9, 9, 9)))
    assert len(losses) == 4
    assert all(loss.untyped_storage().nbytes() == loss.element_size() for loss in losses)
