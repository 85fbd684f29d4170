# stabilab: replicate LLM pre-training stability research side by side.
# corpus -> tokenizer -> token shards -> one training job per run -> tables -> figures (+ HTML report)
from snakemake.utils import min_version

min_version("9.0")  # logger plugins (the profiles use --logger stabilab)


# `--configfile other.yaml` replaces config.yaml (Snakemake would otherwise merge the two, and a
# preset would inherit the default's studies and overrides).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/grokking.smk"


rule all:
    default_target: True
    input:
        lm_targets(),
        grokking_targets(),


onsuccess:
    # where everything is, and the headline numbers (not on a dry run)
    if RUNS and os.path.exists(f"{RES}/tables/headline.csv"):
        from stabilab.summary import print_summary

        print_summary(f"{RES}/tables", FIG)
