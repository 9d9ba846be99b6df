"""Draw UI actions and grounding boxes on a screenshot: used by the evaluation report and the demo.

Coordinates are in the 0-1000 normalised space of the task answers. Clicks are rings, long presses double
rings, swipes arrows from start to end, boxes outlines with a light fill, typed text a caption along the
bottom. Every shape has a white halo so that it stays visible on dark and light screens alike.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from internvl_sft.metrics import COORD_MAX, LONG_PRESS, SWIPE, TYPE, Action, Box, Point

RGB = tuple[int, int, int]
HALO: RGB = (255, 255, 255)
BOX_FILL_ALPHA = 56
CAPTION_ALPHA = 225
# Fonts with CJK glyphs, tried in order (typed text is usually Chinese); Pillow's own font is the fallback.
CJK_FONTS = ("NotoSansCJK-Regular.ttc", "NotoSansSC-Regular.otf", "wqy-microhei.ttc", "wqy-zenhei.ttc",
             "DroidSansFallbackFull.ttf")


@dataclasses.dataclass(frozen=True)
class Style:
    """How one source of marks looks: `label` for legends, `tag` prefixes its captions."""

    label: str
    tag: str
    colour: RGB

    @property
    def css(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.colour)


# Okabe-Ito bluish green and vermillion: distinct for the common colour-vision deficiencies.
GROUND_TRUTH = Style("ground truth", "GT", (0, 158, 115))
PREDICTION = Style("prediction", "pred", (213, 94, 0))

Target = Action | Box
Mark = tuple[Target, Style]


@functools.lru_cache(maxsize=None)
def caption_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for name in CJK_FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def fit(image: Image.Image, max_side: int) -> Image.Image:
    """`image` scaled (up or down) so that its longer side is `max_side` pixels."""
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, Image.Resampling.LANCZOS)


class Painter:
    """Draws marks on transparent layers the size of the screenshot; line widths follow its size.

    Box fills have their own layer beneath the lines, so that one box never hides another one's outline.
    """

    def __init__(self, size: tuple[int, int]):
        self.size = size
        self.fills = Image.new("RGBA", size, (0, 0, 0, 0))
        self.lines = Image.new("RGBA", size, (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.lines)
        short_side = min(size)
        self.width = max(2, round(short_side / 75))
        self.radius = max(7, round(short_side / 20))
        self.font = caption_font(max(11, round(short_side / 16)))
        self.captions: list[tuple[str, RGB]] = []

    def pixel(self, point: Point) -> tuple[float, float]:
        return point[0] * self.size[0] / COORD_MAX, point[1] * self.size[1] / COORD_MAX

    def mark(self, target: Target, style: Style) -> None:
        if isinstance(target, Action):
            self.action(target, style)
        else:
            self.box(target, style)

    def caption(self, text: str, style: Style) -> None:
        self.captions.append((f"{style.tag}: {text}", style.colour))

    def action(self, action: Action, style: Style) -> None:
        if action.kind == TYPE:
            self.caption(f"{action.kind} {action.text or ''}".rstrip(), style)
        elif action.kind == SWIPE:
            self.arrow(self.pixel(action.points[0]), self.pixel(action.points[1]), style.colour)
        else:
            self.ring(self.pixel(action.points[0]), style.colour, double=action.kind == LONG_PRESS)

    def ring(self, centre: tuple[float, float], colour: RGB, double: bool) -> None:
        radii = (self.radius, round(self.radius * 1.6)) if double else (self.radius,)
        for radius in radii:
            self.circle(centre, radius, colour, filled=False)
        self.circle(centre, self.width, colour, filled=True)

    def circle(self, centre: tuple[float, float], radius: float, colour: RGB, filled: bool) -> None:
        x, y = centre
        for fill, extra in ((HALO, 1), (colour, 0)):
            bounds = (x - radius - extra, y - radius - extra, x + radius + extra, y + radius + extra)
            if filled:
                self.draw.ellipse(bounds, fill=fill)
            else:
                self.draw.ellipse(bounds, outline=fill, width=self.width + 2 * extra)

    def arrow(self, start: tuple[float, float], end: tuple[float, float], colour: RGB) -> None:
        """A line from `start` to `end` with a head at `end`; a dot marks where the swipe begins."""
        head = arrow_head(start, end, self.radius * 1.4)
        for fill, extra in ((HALO, 2), (colour, 0)):
            self.draw.line((start, head_base(head)), fill=fill, width=self.width + extra)
            self.draw.polygon(head, fill=fill, outline=fill, width=1 + extra)
        self.circle(start, self.width * 1.5, colour, filled=True)

    def box(self, box: Box, style: Style) -> None:
        left, top = self.pixel((box[0], box[1]))
        right, bottom = self.pixel((box[2], box[3]))
        self.draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), outline=HALO, width=self.width + 2)
        self.draw.rectangle((left, top, right, bottom), outline=style.colour, width=self.width)
        fill = Image.new("RGBA", self.size, (0, 0, 0, 0))
        ImageDraw.Draw(fill).rectangle((left, top, right, bottom), fill=(*style.colour, BOX_FILL_ALPHA))
        self.fills.alpha_composite(fill)

    def draw_captions(self) -> None:
        """The typed-text captions stacked from the bottom edge, first caption on top."""
        pad = self.width * 2
        bottom = self.size[1] - pad
        for text, colour in reversed(self.captions):
            left, top, right, text_bottom = self.draw.textbbox((0, 0), text, font=self.font)
            height = text_bottom - top + 2 * pad
            box = (pad, bottom - height, min(self.size[0] - pad, right - left + 3 * pad), bottom)
            self.draw.rounded_rectangle(box, radius=pad, fill=(*colour, CAPTION_ALPHA))
            self.draw.text((box[0] + pad - left, box[1] + pad - top), text, font=self.font, fill=HALO)
            bottom = box[1] - pad


def arrow_head(start: tuple[float, float], end: tuple[float, float], size: float) -> list[tuple[float, float]]:
    """Triangle at `end` pointing along start -> end (a degenerate swipe gets a zero-area head)."""
    dx, dy = end[0] - start[0], end[1] - start[1]
    length = max((dx * dx + dy * dy) ** 0.5, 1e-9)
    ux, uy = dx / length, dy / length
    base = (end[0] - ux * size, end[1] - uy * size)
    half = size * 0.55
    return [end, (base[0] - uy * half, base[1] + ux * half), (base[0] + uy * half, base[1] - ux * half)]


def head_base(head: list[tuple[float, float]]) -> tuple[float, float]:
    """Middle of the back edge of an arrow head: where the shaft ends, so that the tip stays sharp."""
    return (head[1][0] + head[2][0]) / 2, (head[1][1] + head[2][1]) / 2


def annotate(image: Image.Image, marks: Sequence[Mark], max_side: int | None = None,
             notes: Sequence[tuple[str, Style]] = ()) -> Image.Image:
    """A copy of `image` (scaled to `max_side` when given) with every mark drawn in its style.

    `notes` are extra captions, e.g. an answer that holds no action to draw.
    """
    canvas = fit(image, max_side) if max_side else image.convert("RGB")
    painter = Painter(canvas.size)
    for target, style in marks:
        painter.mark(target, style)
    for text, style in notes:
        painter.caption(text, style)
    painter.draw_captions()
    layered = Image.alpha_composite(canvas.convert("RGBA"), painter.fills)
    return Image.alpha_composite(layered, painter.lines).convert("RGB")
