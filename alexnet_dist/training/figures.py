"""matplotlib figures for the run's and the sweep's pictures, each drawn on its own Agg canvas and
never through pyplot: pyplot's current figure and backend are global state that belongs to
whoever imports this package (a notebook, a script), and drawing a run's pictures must not change
them."""

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(width_px: float, height_px: float, dpi: int = 100, **kw) -> Figure:
    """A figure of the given size in pixels, with its own canvas: `savefig` needs nothing else."""
    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, **kw)
    FigureCanvasAgg(figure)
    return figure
