"""The shape of the code, which the project holds itself to (STYLE.md): ddpm.py in the paper's order
with Ho et al.'s path first, its size budgets, no function over 8 parameters, no import circle,
and the torch-free numbers module holding only numbers. Read from the source, not imported."""
import ast
import glob
import os

import pytest

from conftest import ROOT

PROJECT = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))


def tree(name):
    with open(os.path.join(ROOT, name + ".py")) as f:
        return ast.parse(f.read())


def definitions(node):
    """{name: line} of the functions and classes defined anywhere in node, methods as Class.name."""
    found = {}
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
            found[child.name] = child.lineno
        if isinstance(child, ast.ClassDef):
            found.update({f"{child.name}.{k}": v for k, v in definitions(child).items()})
    return found


def test_ddpm_reads_in_the_papers_order_with_ho_et_al_first():
    at = definitions(tree("ddpm"))
    ho = ["GaussianDiffusion.q_sample", "GaussianDiffusion.q_posterior", "GaussianDiffusion.p_mean_variance",
          "GaussianDiffusion.p_sample", "GaussianDiffusion.p_sample_loop", "GaussianDiffusion.training_loss"]
    later = ["GaussianDiffusion.eps_from_output", "GaussianDiffusion.x0_from_output", "GaussianDiffusion.weighted_mse",
             "GaussianDiffusion.log_variance", "GaussianDiffusion.hybrid_vlb_term", "GaussianDiffusion.bits_per_dim",
             "GaussianDiffusion.ddim_step", "GaussianDiffusion.dpm_solver_step", "ClassifierFreeGuidance",
             "ClassifierGradient", "sample_loop"]
    print({name: at[name] for name in ho + later + ["train", "UNet", "main"]})
    assert [at[name] for name in ho] == sorted(at[name] for name in ho)  # forward, reverse, objective
    assert max(at[name] for name in ho) < min(at[name] for name in later)
    assert at["sample_loop"] < at["train"] < at["UNet"] < at["main"]  # then training, appendix B, the CLI


def test_the_size_budgets_hold():
    with open(os.path.join(ROOT, "ddpm.py")) as f:
        lines = f.read().count("\n")
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read().count("\n")
    train = next(n for n in ast.walk(tree("ddpm")) if isinstance(n, ast.FunctionDef) and n.name == "train")
    train_lines = train.end_lineno - train.lineno + 1
    print(f"ddpm.py {lines} lines (budget 1,250), train() {train_lines} (120), README {readme} (300)")
    assert lines <= 1250 and train_lines <= 120 and readme <= 300


def test_no_function_takes_more_than_8_parameters():
    counts = []
    for path in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py")):
        with open(path) as f:
            for node in ast.walk(ast.parse(f.read())):
                if isinstance(node, ast.FunctionDef):
                    a = node.args
                    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                    counts.append((len(names) + bool(a.vararg) + bool(a.kwarg), f"{os.path.relpath(path, ROOT)}:{node.name}"))
    print("the most parameters:", sorted(counts)[-3:])
    assert max(counts)[0] <= 8, [c for c in counts if c[0] > 8]


def imports(name):
    """The project modules `name` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & set(PROJECT)


def test_no_import_circle_among_the_projects_files():
    graph = {name: imports(name) for name in PROJECT}
    done, path = set(), []

    def visit(name):  # depth first; a name met again on the current path closes a circle
        if name in path:
            raise AssertionError(f"import circle: {' -> '.join(path[path.index(name):] + [name])}")
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)
    for name in PROJECT:
        visit(name)
    print({name: sorted(graph[name]) for name in ("ddpm", "distill", "sample_ort", "schedules")})
    assert not (graph["schedules"] | graph["sampling"] | graph["pictures"]) & {"ddpm", "distill", "export"}


@pytest.mark.parametrize("name,allowed", [("schedules", {"numpy", "typing"}),
                                          ("sampling", {"math", "os", "typing", "numpy", "files", "messages",
                                                        "pictures", "schedules"}),
                                          ("sample_ort", None), ("sample_web", None)])
def test_the_torch_free_modules_import_no_torch(name, allowed):
    """schedules.py holds only the numbers (numpy); sampling.py and sample_ort.py no torch either."""
    found = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module.split(".")[0])
    print(name, "imports", sorted(found))
    assert "torch" not in found and "ddpm" not in found
    if allowed is not None:
        assert found <= allowed, found - allowed
