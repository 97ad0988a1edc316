"""Reading back the Markdown tables that alexnet-runs and a sweep print."""


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of every row of the Markdown table in `text` (the header first), the line of
    dashes under the header left out."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not set(line) <= set("|- "):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows
