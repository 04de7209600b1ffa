from ltune.cli import app

app(prog_name="ltune")
