//! Hugging Face tokenizer files (`data.tokenizer = "hf:PATH/tokenizer.json"`) and token ids beyond
//! uint16, end to end.
//!
//! Tokenizers are trained offline here by the Python `tokenizers` package of the project venv
//! (scripts/setup.sh installs it): fabbrica must encode and decode exactly as it does. Then the
//! binary prepares, trains a few tiny CPU steps and samples with them, including a vocabulary of
//! more than 65536 ids (uint32 token files).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::describe;
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `python` of the project venv on `script` with `args`; returns its stdout parsed as JSON.
fn python_json(script: &str, args: &[&Path]) -> Value {
    let python = repo_root().join(".venv/bin/python");
    let out = Command::new(&python).arg("-c").arg(script).args(args).output().unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(out.status.success(), "python failed (scripts/setup.sh installs `tokenizers` into .venv)\n{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("python printed no JSON: {e}\n{}", describe(&out)))
}

/// Runs `fabbrica` with `args`, backtraces on so that a panic cannot pass as a clean error.
fn fabbrica<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fabbrica"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .expect("cannot run the fabbrica binary")
}

fn assert_success(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "expected success\n{}", describe(out));
}

/// Exit 2 and exactly one `error: ` line containing every needle.
fn assert_user_error(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "expected exit code 2\n{}", describe(out));
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected exactly one stderr line\n{}", describe(out));
    assert!(lines[0].starts_with("error: ") && !stderr.to_lowercase().contains("panicked"), "{}", describe(out));
    for n in needles {
        assert!(lines[0].contains(n), "stderr line does not mention {n:?}\n{}", describe(out));
    }
    lines[0].to_string()
}

/// A few KB of English-like text with digits, punctuation, runs of spaces and some non-ASCII.
fn corpus() -> String {
    let names = ["Anna", "Bruno", "Carla", "Dario", "Elena", "Fabio", "Giulia", "Marco"];
    let things = ["the loom", "a lathe", "the furnace", "his ledger", "her notebook", "the press"];
    let mut s = String::new();
    for i in 0..60 {
        let who = names[i % names.len()];
        let what = things[(i * 7 + 3) % things.len()];
        s.push_str(&format!(
            "In the morning {who} walked to the factory and looked at {what} for {} minutes. \
             \"It won't run by itself,\" {who} said;  the others laughed — it was day {i} of the season.\n",
            i * 37 % 1000
        ));
        if i % 5 == 0 {
            s.push_str("By evening the yard was quiet again, and the smoke drifted east over the river. Città, Straße, naïve.\n\n");
        }
    }
    s
}

/// Trains four small tokenizers of different families on `corpus` and saves them into `dir`;
/// prints, per tokenizer, Python's ids and decoding of every probe, its vocabulary size and the
/// ids of its special tokens.
const TRAIN_TOKENIZERS: &str = r#"
import json, sys
from tokenizers import Tokenizer, Regex, models, trainers, pre_tokenizers, decoders, processors, normalizers
out, corpus_path, probes_path = sys.argv[1:4]
text = open(corpus_path, encoding="utf-8").read()
probes = json.load(open(probes_path, encoding="utf-8"))
result = {}

def save(name, tok, specials):
    path = f"{out}/{name}.json"
    tok.save(path)
    tok = Tokenizer.from_file(path)  # exactly what fabbrica reads
    encs = [tok.encode(p).ids for p in probes]
    result[name] = {
        "ids": encs,
        "decoded": [tok.decode(e, skip_special_tokens=False) for e in encs],
        "vocab": tok.get_vocab_size(with_added_tokens=True),
        "specials": {s: tok.token_to_id(s) for s in specials},
    }

def byte_bpe(split, specials, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = split
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok

# GPT-2: byte-level BPE, GPT-2's regex, nothing added around a sequence.
gpt2 = byte_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"], 420)
gpt2.post_processor = processors.ByteLevel(trim_offsets=False)
save("gpt2_bpe", gpt2, ["<|endoftext|>"])

# Llama 3: its split regex, then bytes; the post-processor puts <|begin_of_text|> first.
pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
llama = byte_bpe(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), ["<|begin_of_text|>", "<|end_of_text|>"], 450)
bos = llama.token_to_id("<|begin_of_text|>")
llama.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
save("llama3_bpe", llama, ["<|begin_of_text|>", "<|end_of_text|>"])

# BERT: WordPiece, lowercasing normalizer, [CLS] ... [SEP].
wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
wp.normalizer = normalizers.BertNormalizer(lowercase=True)
wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
wp.decoder = decoders.WordPiece()
wp.train_from_iterator([text], trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False))
wp.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
    special_tokens=[("[CLS]", wp.token_to_id("[CLS]")), ("[SEP]", wp.token_to_id("[SEP]"))])
save("wordpiece", wp, ["[CLS]", "[SEP]"])

# SentencePiece-like: Unigram, NFKC, Metaspace.
uni = Tokenizer(models.Unigram())
uni.normalizer = normalizers.NFKC()
uni.pre_tokenizer = pre_tokenizers.Metaspace()
uni.decoder = decoders.Metaspace()
uni.train_from_iterator([text], trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"], unk_token="<unk>", show_progress=False))
save("unigram", uni, ["</s>"])
print(json.dumps(result))
"#;

fn probes(corpus: &str) -> Vec<String> {
    vec![
        corpus.to_string(),
        "Hello world".into(),
        "".into(),
        "  leading and trailing spaces  \n\n\ttabs\r\nand CRLF".into(),
        "numbers 1234567 3.14159 and dates 2025-12-01".into(),
        "Ünïcödé ✓ 日本語 emoji 🦀 Città".into(),
        "special <|endoftext|> and <|end_of_text|> and [SEP] in text".into(),
        "they'll SAY it's 'quoted' — wasn't it?".into(),
    ]
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn tokenizers_trained_in_python_encode_and_decode_identically() {
    let dir = tempfile::tempdir().unwrap();
    let text = corpus();
    let corpus_path = dir.path().join("corpus.txt");
    std::fs::write(&corpus_path, &text).unwrap();
    let probes = probes(&text);
    let probes_path = dir.path().join("probes.json");
    std::fs::write(&probes_path, serde_json::to_string(&probes).unwrap()).unwrap();
    let py = python_json(TRAIN_TOKENIZERS, &[dir.path(), &corpus_path, &probes_path]);

    for name in ["gpt2_bpe", "llama3_bpe", "wordpiece", "unigram"] {
        let want = &py[name];
        let tok = fabbrica_data::Tokenizer::hf(&dir.path().join(format!("{name}.json"))).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(tok.vocab_size() as u64, want["vocab"].as_u64().unwrap(), "{name}: vocabulary size");
        for (i, probe) in probes.iter().enumerate() {
            let ids = tok.encode(probe).unwrap();
            let want_ids = u32s(&want["ids"][i]);
            assert_eq!(ids, want_ids, "{name}: ids of probe {i} {:?}", probe.chars().take(60).collect::<String>());
            assert_eq!(tok.decode(&ids), want["decoded"][i].as_str().unwrap(), "{name}: decoding of probe {i}");
        }
        // Merged pieces, not one token per character: the comparison above covered real merges.
        let n = tok.encode(&text).unwrap().len();
        assert!(n < text.chars().count() * 3 / 4, "{name}: {n} tokens for {} characters", text.chars().count());
    }
    // What the files say about special tokens: GPT-2's and Llama 3's end-of-text are found, BOS is
    // what the Llama 3 post-processor adds in front of any text, even an empty one.
    let special = |name: &str, s: &str| py[name]["specials"][s].as_u64().unwrap() as u32;
    let gpt2 = fabbrica_data::Tokenizer::hf(&dir.path().join("gpt2_bpe.json")).unwrap();
    assert_eq!(gpt2.eot(), Some(special("gpt2_bpe", "<|endoftext|>")));
    assert_eq!(gpt2.encode("").unwrap(), Vec::<u32>::new());
    let llama = fabbrica_data::Tokenizer::hf(&dir.path().join("llama3_bpe.json")).unwrap();
    assert_eq!(llama.eot(), Some(special("llama3_bpe", "<|end_of_text|>")));
    assert_eq!(llama.encode("").unwrap(), vec![special("llama3_bpe", "<|begin_of_text|>")]);
    let unigram = fabbrica_data::Tokenizer::hf(&dir.path().join("unigram.json")).unwrap();
    assert_eq!(unigram.eot(), Some(special("unigram", "</s>")));
    let wordpiece = fabbrica_data::Tokenizer::hf(&dir.path().join("wordpiece.json")).unwrap();
    assert_eq!(wordpiece.eot(), None, "BERT has no end-of-text token");

    // `sample` streams: with each of these decoders (byte-level, WordPiece's `##`, Metaspace's
    // `▁` that a line start would drop) the printed pieces join to the one-shot sample.
    tch::set_num_threads(1);
    for name in ["gpt2_bpe", "llama3_bpe", "wordpiece", "unigram"] {
        let tok = fabbrica_data::Tokenizer::hf(&dir.path().join(format!("{name}.json"))).unwrap();
        let cfg = fabbrica_models::GptConfig {
            vocab_size: tok.vocab_size(),
            block_size: 32,
            n_layer: 1,
            n_head: 2,
            n_embd: 16,
            dropout: 0.0,
            ..fabbrica_models::GptConfig::default()
        };
        tch::manual_seed(5);
        let model = fabbrica_models::Model::new(&fabbrica_models::ModelConfig::Gpt(cfg), tch::Device::Cpu).unwrap();
        for prompt in ["", "Hello world\n  indented"] {
            let whole = fabbrica_train::sample::sample_text(&model, &tok, prompt, 400, 1.0, None, 11);
            let mut pieces: Vec<String> = Vec::new();
            let mut emit = |p: &str| pieces.push(p.to_string());
            fabbrica_train::sample::sample_streaming(&model, &tok, prompt, 400, 1.0, None, 11, Some(&mut emit));
            assert_eq!(pieces.concat(), whole, "{name}, prompt {prompt:?}: streamed pieces differ from the sample");
        }
        // Real text through the streaming decoder, newlines and indentation included (a random
        // model seldom draws a newline): the pieces join to the continuation, many of them.
        for (context, rest) in [("", text.as_str()), ("def f(x):\n", "    return x\n\n    y = 2\n  z\n"), ("a b", " c\n d\n\n e")] {
            // (Any ids will do, what a post-processor adds around a sequence included.)
            let (c, g) = (tok.encode(context).unwrap(), tok.encode(rest).unwrap());
            let pieces = fabbrica_train::sample::stream_pieces(&tok, &c, &g);
            assert_eq!(pieces.concat(), fabbrica_train::sample::continuation(&tok, &c, &g), "{name}: streaming {rest:?} after {context:?}");
            assert!(pieces.len() > 1, "{name}: {pieces:?}");
        }
    }
}

/// Arguments for a tiny CPU training run reading `data` and writing `out_dir`.
fn tiny_train_args(data: &Path, out_dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec!["train".to_string()];
    let sets = [
        "run.device=cpu",
        "model.n_layer=1",
        "model.n_embd=32",
        "model.n_head=2",
        "model.block_size=16",
        "train.batch_size=4",
        "train.max_steps=3",
        "train.eval_iters=1",
        "train.log_interval=1",
        "run.sample_tokens=0",
        "run.threads=1",
    ];
    let paths = [format!("data.path={}", data.display()), format!("run.out_dir={}", out_dir.display())];
    for kv in sets.iter().copied().chain(paths.iter().map(String::as_str)).chain(extra.iter().copied()) {
        a.push("--set".into());
        a.push(kv.into());
    }
    a
}

/// The final step's loss in `<out_dir>/metrics.jsonl`; panics if training logged no finite loss.
fn last_loss(out_dir: &Path) -> f64 {
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).expect("metrics.jsonl");
    let losses: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("step").is_some())
        .filter_map(|v| v.get("loss").and_then(Value::as_f64))
        .collect();
    let last = *losses.last().unwrap_or_else(|| panic!("no loss in metrics.jsonl:\n{metrics}"));
    assert!(last.is_finite(), "{metrics}");
    last
}

fn sample(checkpoint: &Path, prompt: &str, tokens: usize) -> Output {
    let tokens = tokens.to_string();
    fabbrica(&[
        "sample".as_ref(),
        "--checkpoint".as_ref(),
        checkpoint.as_os_str(),
        "--prompt".as_ref(),
        prompt.as_ref(),
        "--tokens".as_ref(),
        tokens.as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
    ])
}

/// Little-endian tokens of `width` bytes.
fn read_tokens(path: &Path, width: usize) -> Vec<u32> {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes.len() % width, 0, "{}: {} bytes", path.display(), bytes.len());
    bytes.chunks_exact(width).map(|b| b.iter().rev().fold(0u32, |acc, &x| (acc << 8) | u32::from(x))).collect()
}

/// Encodes the file argv[2] with the tokenizer argv[1]; prints the ids.
const ENCODE: &str = r#"
import json, sys
from tokenizers import Tokenizer
print(json.dumps(Tokenizer.from_file(sys.argv[1]).encode(open(sys.argv[2], encoding="utf-8").read()).ids))
"#;

#[test]
fn prepare_train_sample_with_a_hugging_face_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let text = corpus();
    let input = dir.path().join("input.txt");
    std::fs::write(&input, &text).unwrap();
    let probes_path = dir.path().join("probes.json");
    std::fs::write(&probes_path, "[]").unwrap();
    let tokenizers = dir.path().join("tokenizers");
    std::fs::create_dir(&tokenizers).unwrap();
    python_json(TRAIN_TOKENIZERS, &[&tokenizers, &input, &probes_path]);
    let tk = tokenizers.join("llama3_bpe.json");

    // prepare: uint16 files holding exactly Python's ids, the tokenizer copied beside them.
    let prepared = dir.path().join("prepared");
    let spec = format!("hf:{}", tk.display());
    let out = fabbrica(&[
        "prepare".as_ref(),
        "--input".as_ref(),
        input.as_os_str(),
        "--tokenizer".as_ref(),
        spec.as_ref(),
        "--out".as_ref(),
        prepared.as_os_str(),
    ]);
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("hf tokenizer"), "{}", describe(&out));
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(prepared.join("meta.json")).unwrap()).unwrap();
    assert_eq!(
        (meta["tokenizer"].as_str(), meta["dtype"].as_str(), meta["tokenizer_file"].as_str()),
        (Some("hf"), Some("uint16"), Some("tokenizer.json"))
    );
    assert_eq!(std::fs::read(prepared.join("tokenizer.json")).unwrap(), std::fs::read(&tk).unwrap());
    let want = u32s(&python_json(ENCODE, &[&tk, &input]));
    let got = [read_tokens(&prepared.join("train.bin"), 2), read_tokens(&prepared.join("val.bin"), 2)].concat();
    assert_eq!(got, want, "prepared tokens differ from Python's encoding");

    // train from the prepared directory; the checkpoint finds the tokenizer for sampling.
    let run = dir.path().join("run");
    assert_success(&fabbrica(&tiny_train_args(&prepared, &run, &[])));
    last_loss(&run);
    // The resolved config records the tokenizer the directory named (data.tokenizer was left at
    // its default, char).
    let cfg = fabbrica_train::Config::resolve(None, Some(&run.join("config.toml")), &[]).unwrap();
    assert_eq!(cfg.data.tokenizer, format!("hf:{}", prepared.join("tokenizer.json").display()));
    let prompt = "In the morning Anna";
    let out = sample(&run, prompt, 12);
    assert_success(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with(prompt) && !stdout[prompt.len()..].contains(prompt), "prompt once, then the sample\n{}", describe(&out));
    assert_success(&sample(&run, "", 8));
    // The export carries the tokenizer file, byte for byte.
    let exported = dir.path().join("exported");
    assert_success(&fabbrica(&["export".as_ref(), "--checkpoint".as_ref(), run.as_os_str(), "--out".as_ref(), exported.as_os_str()]));
    assert_eq!(std::fs::read(exported.join("tokenizer.json")).unwrap(), std::fs::read(&tk).unwrap());
    assert!(exported.join("config.json").is_file() && exported.join("model.safetensors").is_file());

    // train straight from the text file with data.tokenizer = hf:PATH.
    let run_text = dir.path().join("run_text");
    let tk_set = format!("data.tokenizer={spec}");
    assert_success(&fabbrica(&tiny_train_args(&input, &run_text, &[&tk_set])));
    last_loss(&run_text);
    assert_success(&sample(&run_text, "By evening", 5));

    // The checkpoint pins the tokenizer file's content: changed or gone, sampling says so.
    let copy = prepared.join("tokenizer.json");
    let original = std::fs::read(&copy).unwrap();
    std::fs::write(&copy, String::from_utf8(original.clone()).unwrap().replacen("\"version\"", " \"version\"", 1)).unwrap();
    assert_user_error(&sample(&run, "x", 2), &["tokenizer.json", "changed"]);
    std::fs::remove_file(&copy).unwrap();
    assert_user_error(&sample(&run, "x", 2), &["tokenizer.json", "does not exist"]);
    // And so does training on the prepared directory.
    assert_user_error(&fabbrica(&tiny_train_args(&prepared, &dir.path().join("run2"), &[])), &["tokenizer.json"]);
}

/// A WordLevel tokenizer of argv[2] words `w0`..`w{n-1}` (plus `[UNK]` and `<|endoftext|>`),
/// saved to argv[1]; prints Python's encoding of the text file argv[3].
const WIDE_WORD_LEVEL: &str = r#"
import json, sys
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
path, n, text_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
vocab = {f"w{i}": i for i in range(n)}
vocab["[UNK]"] = n
tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.add_special_tokens(["<|endoftext|>"])
tok.save(path)
tok = Tokenizer.from_file(path)
print(json.dumps(tok.encode(open(text_path, encoding="utf-8").read()).ids))
"#;

#[test]
fn a_vocabulary_beyond_65536_ids_writes_uint32_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let n = 70_000u32;
    // Words spread over the whole vocabulary, the top ids included.
    let mut words: Vec<String> = (0..600u32).map(|i| format!("w{}", (i * 7919 + 13) % n)).collect();
    words.extend(["w69999", "w65536", "w65535", "w0", "nonsense"].map(String::from));
    let text = words.join(" ");
    let input = dir.path().join("words.txt");
    std::fs::write(&input, &text).unwrap();
    let tk = dir.path().join("wide.json");
    let n_arg = PathBuf::from(n.to_string());
    let want = u32s(&python_json(WIDE_WORD_LEVEL, &[&tk, &n_arg, &input]));
    assert!(want.contains(&69_999) && want.contains(&n), "{want:?}");

    let prepared = dir.path().join("prepared");
    let spec = format!("hf:{}", tk.display());
    let out = fabbrica(&[
        "prepare".as_ref(),
        "--input".as_ref(),
        input.as_os_str(),
        "--tokenizer".as_ref(),
        spec.as_ref(),
        "--out".as_ref(),
        prepared.as_os_str(),
    ]);
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("uint32"), "{}", describe(&out));
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(prepared.join("meta.json")).unwrap()).unwrap();
    assert_eq!((meta["dtype"].as_str(), meta["vocab_size"].as_u64()), (Some("uint32"), Some(u64::from(n) + 2)));
    let got = [read_tokens(&prepared.join("train.bin"), 4), read_tokens(&prepared.join("val.bin"), 4)].concat();
    assert_eq!(got, want);
    assert_eq!(std::fs::metadata(prepared.join("train.bin")).unwrap().len() % 4, 0);

    // The same through the library: loaded (mapped) ids decode back to the text.
    let ds = fabbrica_data::load(&prepared, &fabbrica_data::TokenizerSpec::Char, 8, 0.1).unwrap();
    let ids = [ds.train.to_vec(), ds.val.to_vec()].concat();
    assert_eq!(ds.tokenizer.decode(&ids), text.replace("nonsense", "[UNK]"));

    // A model with 70002 embedding rows trains on it and samples words of the vocabulary.
    let run = dir.path().join("run");
    assert_success(&fabbrica(&tiny_train_args(&prepared, &run, &["train.max_steps=2"])));
    last_loss(&run);
    let out = sample(&run, "w69999 w1", 6);
    assert_success(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Words joined by spaces, the prompt's last word included: the continuation is decoded in context.
    assert!(stdout.starts_with("w69999 w1 "), "{}", describe(&out));
    let sampled: Vec<&str> = stdout.split_whitespace().skip(2).collect();
    assert_eq!(sampled.len(), 6, "{}", describe(&out));
    assert!(sampled.iter().all(|w| w.starts_with('w') || *w == "[UNK]" || *w == "<|endoftext|>"), "{}", describe(&out));

    // A truncated uint32 file is named as such.
    let bin = prepared.join("val.bin");
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes.truncate(bytes.len() - 2);
    std::fs::write(&bin, bytes).unwrap();
    assert_user_error(&fabbrica(&tiny_train_args(&prepared, &dir.path().join("run2"), &[])), &["val.bin", "uint32", "multiple of 4"]);
}

#[test]
fn sample_prints_the_prompt_once() {
    // Char level: one token per character, so the output is exactly the prompt plus N characters.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.txt");
    std::fs::write(&input, corpus()).unwrap();
    let run = dir.path().join("run");
    assert_success(&fabbrica(&tiny_train_args(&input, &run, &[])));
    let prompt = "In the morning";
    let out = sample(&run, prompt, 7);
    assert_success(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let printed = stdout.strip_suffix('\n').unwrap_or(&stdout);
    assert!(printed.starts_with(prompt), "{}", describe(&out));
    assert_eq!(printed.chars().count(), prompt.chars().count() + 7, "{}", describe(&out));
}
