"""Synthetic chest radiographs, part 3: named "looks", dataset styles a recipe was not tuned on.

A :class:`Look` is a set of knobs over the drawing in :mod:`.render` and the geometry in
:mod:`.anatomy`. Every knob's neutral value leaves the code path of today's generator as it
is, so ``standard`` (all neutral) gives the same bytes as before looks existed. The other
looks move several knobs at once (contrast and noise, body and lung geometry, how a
pneumothorax shows) but keep it visible by eye at 128 px: a look tests robustness, not
whether a model can find what a human cannot.

A look draws the same random numbers in the same order up to the final noise (``grain``
draws normal instead of uniform numbers there), so a look without geometry knobs (``faint``)
shows exactly the patient and the pneumothorax of ``standard`` on the same seed. Geometry
knobs reshape the same sampled patient and collapse; the vessel tree then grows differently.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Look:
    """Knobs of one look; the defaults are neutral (today's generator)."""

    # Display window: the image is scaled about mid-grey by this; < 1 flattens every density
    # difference (a washed-out, badly exposed film), > 1 is a hard, high-contrast print.
    contrast: float = 1.0
    # Multiplies the random gamma of the detector response: > 1 darkens the mid-tones (lungs),
    # < 1 lifts them.
    gamma: float = 1.0
    # Multiplies the random noise standard deviation (quantum noise and film grain).
    noise: float = 1.0
    # Noise correlation length (Gaussian sigma) in pixels at 1024 px; 0 is today's white,
    # per-pixel noise, which averages away when the image is downsized for training; a grain
    # of a few pixels survives it, as real film grain and detector noise partly do.
    grain: float = 0.0
    # Gaussian blur sigma in pixels at 1024 px applied before the noise (motion, a soft
    # detector); it also softens the pleural line.
    blur: float = 0.0
    # Unsharp-mask amount (sigma 8 px at 1024): the edge enhancement of CR post-processing,
    # which crispens the pleural line and the rib edges.
    edge_enhance: float = 0.0
    # Soft tissue outside the rib cage (body half-width minus the outer lung edge), as a
    # multiple: > 1 a larger patient, < 1 a thin one.
    body_margin: float = 1.0
    # Lateral width of each lung field, as a multiple (hyperinflation or small lungs).
    lung_width: float = 1.0
    # Apex-to-base height of each lung field, as a multiple (inspiration depth).
    lung_height: float = 1.0
    # Multiplies how much darker the pneumothorax is than the lung it replaces (its extra air
    # column); the missing vascular markings are a separate cue, see ``vessel_contrast``.
    ptx_dark: float = 1.0
    # Multiplies the brightness of the visceral pleural line bounding the collapsed lung.
    pleural_line: float = 1.0
    # Multiplies the width of that line (its Gaussian sigma).
    pleural_width: float = 1.0
    # Multiplies the contrast of the vascular markings and parenchyma whose absence marks a
    # pneumothorax.
    vessel_contrast: float = 1.0


LOOKS: dict[str, Look] = {
    # Today's generator, byte for byte.
    "standard": Look(),
    # A washed-out film: low contrast, a softer and fainter pleural line, a pneumothorax that
    # is less dark and marked less by missing vessels, slightly soft; still plainly visible.
    "faint": Look(contrast=0.7, gamma=0.9, blur=1.5, ptx_dark=0.85, pleural_line=0.6,
                  pleural_width=1.6, vessel_contrast=0.85),
    # A noisy, soft bedside film of a larger patient with shallow inspiration: strong grain
    # that survives downsizing, blur, more soft tissue, wider and shorter lungs.
    "noisy": Look(noise=4.5, grain=2.0, blur=3.0, body_margin=1.6, lung_width=1.08,
                  lung_height=0.9),
    # A hard, edge-enhanced print of a thin patient with deep inspiration: high contrast, a
    # thin crisp pleural line, less soft tissue, taller and narrower lungs.
    "sharp": Look(contrast=1.1, gamma=1.3, edge_enhance=0.8, noise=0.5, body_margin=0.6,
                  lung_width=0.92, lung_height=1.1, pleural_line=1.4, pleural_width=0.6,
                  ptx_dark=1.2),
}

