// METEOR 1.5 exactly as pycocoevalcap runs it (`meteor-1.5.jar - - -stdio -l en -norm`):
// normalize + lowercase, candidate matches from the exact / stem / synonym / paraphrase modules,
// METEOR's beam search over them (aligner weights 1, .5, .5, .5; beam 40; its quirks kept: Java int
// truncation of weighted match counts, the distance increment landing on the parent path, fixed
// one-to-one matches), sufficient statistics per reference, the first best reference, and the
// corpus score from summed statistics (the modified jar's EVAL; a perfect segment's chunk is not
// added). Scoring parameters for English "rank": alpha .85, beta .2, gamma .6, delta .75,
// module weights 1, .6, .8, .6. All arithmetic is float64 in Java's order.
#pragma once

#include "metrics/meteor_data.hpp"
#include "metrics/meteor_normalizer.hpp"
#include "metrics/snowball_english.hpp"
#include "metrics/text.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace tq::metrics {

struct MeteorStats {
  double test_len = 0, ref_len = 0, test_func = 0, ref_func = 0;
  std::array<double, 4> test_content{}, ref_content{}, test_function{}, ref_function{};
  double chunks = 0, test_word_matches = 0, ref_word_matches = 0;

  double test_total() const {
    double t = 0;
    for (int i = 0; i < 4; ++i) t = t + test_content[i] + test_function[i];
    return t;
  }
  double ref_total() const {
    double t = 0;
    for (int i = 0; i < 4; ++i) t = t + ref_content[i] + ref_function[i];
    return t;
  }
  bool perfect() const { return test_total() == test_len && ref_total() == ref_len && chunks == 1.0; }

  // MeteorStats.addStats: a perfect segment's chunk is not summed.
  void add(const MeteorStats& s) {
    test_len += s.test_len;
    ref_len += s.ref_len;
    test_func += s.test_func;
    ref_func += s.ref_func;
    for (int i = 0; i < 4; ++i) {
      test_content[i] += s.test_content[i];
      ref_content[i] += s.ref_content[i];
      test_function[i] += s.test_function[i];
      ref_function[i] += s.ref_function[i];
    }
    if (!s.perfect()) chunks += s.chunks;
    test_word_matches += s.test_word_matches;
    ref_word_matches += s.ref_word_matches;
  }
};

// MeteorScorer.computeMetrics, in Java's operation order.
inline double meteor_score(const MeteorStats& s) {
  constexpr double alpha = 0.85, beta = 0.20, gamma = 0.60, delta = 0.75;
  constexpr double w[4] = {1.0, 0.6, 0.8, 0.6};
  const double test_wlen = (delta * (s.test_len - s.test_func)) + ((1.0 - delta) * (s.test_func));
  const double ref_wlen = (delta * (s.ref_len - s.ref_func)) + ((1.0 - delta) * (s.ref_func));
  double test_wm = 0, ref_wm = 0;
  for (int i = 0; i < 4; ++i) test_wm += s.test_content[i] * w[i] * delta;
  for (int i = 0; i < 4; ++i) ref_wm += s.ref_content[i] * w[i] * delta;
  for (int i = 0; i < 4; ++i) test_wm += s.test_function[i] * w[i] * (1.0 - delta);
  for (int i = 0; i < 4; ++i) ref_wm += s.ref_function[i] * w[i] * (1.0 - delta);
  const double precision = test_wm / test_wlen;
  const double recall = ref_wm / ref_wlen;
  const double fmean = 1.0 / (((1.0 - alpha) / precision) + (alpha / recall));
  double frag;
  if (s.test_total() == s.test_len && s.ref_total() == s.ref_len && s.chunks == 1)
    frag = 0;
  else
    frag = s.chunks / ((s.test_word_matches + s.ref_word_matches) / 2);
  const double penalty = gamma * std::pow(frag, beta);
  const double score = fmean * (1.0 - penalty);
  if (std::isnan(score)) return 0;
  return std::max(score, 0.0);
}

namespace meteor_detail {

struct Match {
  int start, length;            // reference (line2) span
  int match_start, match_length;  // test (line1) span
  int module;
};

// What the matchers need to know about one lowercased token; cached per distinct token.
struct TokenInfo {
  int32_t key;       // String.hashCode of the word
  int32_t stem_key;  // String.hashCode of its Snowball stem
  std::vector<int32_t> synsets;  // sorted union of synsets(w) and stemSynsets(w)
  int32_t para_id;   // paraphrase vocabulary id, -1 if unknown
  bool function_word;
};

struct Path {
  std::vector<const Match*> matches;  // by reference start index
  std::vector<char> used1, used2;
  int match_count = 0, matches1 = 0, matches2 = 0, all1 = 0, all2 = 0, chunks = 0, idx = 0, last_end = -1,
      distance = 0;

  bool is_used(const Match& m) const {
    for (int i = 0; i < m.length; ++i)
      if (used2[m.start + i]) return true;
    for (int i = 0; i < m.match_length; ++i)
      if (used1[m.match_start + i]) return true;
    return false;
  }
  void set_used(const Match& m) {
    for (int i = 0; i < m.length; ++i) used2[m.start + i] = 1;
    for (int i = 0; i < m.match_length; ++i) used1[m.match_start + i] = 1;
  }
};

// Constants.PARTIAL_COMPARE_TOTAL as a strict "x before y" for a stable sort.
inline bool path_before(const Path& x, const Path& y) {
  const int dx = x.matches1 + x.matches2, dy = y.matches1 + y.matches2;
  if (dx != dy) return dx > dy;
  if (x.chunks != y.chunks) return x.chunks < y.chunks;
  return x.distance < y.distance;
}

}  // namespace meteor_detail

class MeteorScorer {
 public:
  explicit MeteorScorer(const MeteorData& data) : data_(data) {}

  // Per-item statistics for one hypothesis against its references (raw caption strings, as
  // pycocoevalcap receives them).
  MeteorStats item_stats(const std::vector<std::string>& refs, const std::string& hyp) {
    std::vector<std::u32string> ref_parts;
    std::u32string test;
    split_request(refs, hyp, ref_parts, test);
    const auto test_tokens = prepare(test);
    MeteorStats best;
    double best_score = -1;
    for (const auto& r : ref_parts) {
      const auto ref_tokens = prepare(r);
      const MeteorStats s = align_stats(test_tokens, ref_tokens);
      const double sc = meteor_score(s);
      if (sc > best_score) {
        best_score = sc;
        best = s;
      }
    }
    return best;
  }

 private:
  using Match = meteor_detail::Match;
  using TokenInfo = meteor_detail::TokenInfo;
  using Path = meteor_detail::Path;

  const MeteorData& data_;
  EnglishStemmer stemmer_;
  std::unordered_map<std::u32string, std::unique_ptr<TokenInfo>> cache_;

  // Rebuilds the wrapper's "SCORE ||| refs ||| hyp" line and splits it as the jar does.
  static void split_request(const std::vector<std::string>& refs, const std::string& hyp_in,
                            std::vector<std::u32string>& ref_parts, std::u32string& test) {
    std::string hyp = hyp_in;
    for (size_t p; (p = hyp.find("|||")) != std::string::npos;) hyp.erase(p, 3);
    std::string cleaned;
    for (size_t i = 0; i < hyp.size(); ++i) {
      if (hyp[i] == ' ' && i + 1 < hyp.size() && hyp[i + 1] == ' ') {
        cleaned.push_back(' ');
        ++i;
      } else {
        cleaned.push_back(hyp[i]);
      }
    }
    std::string line = "SCORE";
    for (const auto& r : refs) line += " ||| " + r;
    line += " ||| " + cleaned;
    // Newlines would end the request line in the jar's protocol; they act as spaces here.
    for (auto& c : line)
      if (c == '\n' || c == '\r') c = ' ';
    std::vector<std::u32string> parts;
    const std::u32string u = utf8_to_u32(line);
    size_t start = 0;
    for (;;) {
      const size_t p = u.find(U"|||", start);
      if (p == std::u32string::npos) break;
      parts.push_back(u.substr(start, p - start));
      start = p + 3;
    }
    parts.push_back(u.substr(start));
    while (!parts.empty() && parts.back().empty()) parts.pop_back();  // String.split drops these
    ref_parts.clear();
    for (size_t i = 1; i + 1 < parts.size(); ++i) ref_parts.emplace_back(java_trim(parts[i]));
    test = parts.size() >= 3 ? std::u32string(java_trim(parts.back())) : std::u32string();
  }

  std::vector<const TokenInfo*> prepare(const std::u32string& line) {
    const std::u32string norm = java_lower(meteor_normalize(line, data_.nonbreaking));
    std::vector<const TokenInfo*> out;
    for (const auto& tok : java_tokenize(norm)) out.push_back(&info(tok));
    return out;
  }

  const std::vector<int32_t>* synsets_of(const std::string& w) const { return data_.synonyms.find(w); }

  // SynonymDictionary.morph: WordNet's detachment rules, first result that has synsets.
  std::string morph(const std::u32string& w) const {
    static const char32_t* const sufx[] = {U"s", U"ses", U"xes", U"zes", U"ches", U"shes", U"men", U"ies", U"s", U"ies",
                                           U"es", U"es", U"ed", U"ed", U"ing", U"ing", U"er", U"est", U"er", U"est"};
    static const char32_t* const addr[] = {U"", U"s", U"x", U"z", U"ch", U"sh", U"man", U"y", U"", U"y",
                                           U"e", U"", U"e", U"", U"e", U"", U"", U"", U"e", U"e"};
    const std::u32string_view v(w);
    if (v.ends_with(U"ss") || w.size() <= 2) return u32_to_utf8(w);
    for (int i = 0; i < 20; ++i) {
      const std::u32string_view s(sufx[i]);
      if (!v.ends_with(s)) continue;
      std::u32string cand(v.substr(0, v.size() - s.size()));
      cand += addr[i];
      const std::string c8 = u32_to_utf8(cand);
      if (synsets_of(c8)) return c8;
    }
    return {};
  }

  const TokenInfo& info(const std::u32string& tok) {
    auto it = cache_.find(tok);
    if (it != cache_.end()) return *it->second;
    auto ti = std::make_unique<TokenInfo>();
    const std::string w8 = u32_to_utf8(tok);
    ti->key = java_hash(tok);
    ti->stem_key = java_hash(stemmer_.stem(tok));
    if (const auto* s = synsets_of(w8)) ti->synsets = *s;
    if (auto b = data_.synonyms.bases.find(w8); b != data_.synonyms.bases.end()) {
      for (const auto& base : b->second)
        if (const auto* s = synsets_of(base)) ti->synsets.insert(ti->synsets.end(), s->begin(), s->end());
    } else if (const auto* s = synsets_of(morph(tok))) {
      ti->synsets.insert(ti->synsets.end(), s->begin(), s->end());
    }
    std::sort(ti->synsets.begin(), ti->synsets.end());
    ti->synsets.erase(std::unique(ti->synsets.begin(), ti->synsets.end()), ti->synsets.end());
    ti->para_id = data_.paraphrase.translate(w8);
    ti->function_word = data_.function_words.count(u32_to_utf8(java_lower(tok))) > 0;
    const TokenInfo& ref = *ti;
    cache_.emplace(tok, std::move(ti));
    return ref;
  }

  static bool intersects(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
    size_t i = 0, j = 0;
    while (i < a.size() && j < b.size()) {
      if (a[i] == b[j]) return true;
      if (a[i] < b[j]) ++i;
      else ++j;
    }
    return false;
  }

  struct Stage {
    std::vector<std::vector<Match>> cand;  // by reference start index
    std::vector<int> cov1, cov2;
    void add(const Match& m) {
      cand[m.start].push_back(m);
      for (int k = 0; k < m.match_length; ++k) ++cov1[m.match_start + k];
      for (int k = 0; k < m.length; ++k) ++cov2[m.start + k];
    }
  };

  void match_words(Stage& st, const std::vector<const TokenInfo*>& t, const std::vector<const TokenInfo*>& r,
                   int modules) const {
    const int nt = static_cast<int>(t.size()), nr = static_cast<int>(r.size());
    for (int j = 0; j < nr; ++j)
      for (int i = 0; i < nt; ++i)
        if (t[i]->key == r[j]->key) st.add({j, 1, i, 1, 0});
    if (modules < 2) return;
    for (int j = 0; j < nr; ++j)
      for (int i = 0; i < nt; ++i)
        if (t[i]->stem_key == r[j]->stem_key && t[i]->key != r[j]->key) st.add({j, 1, i, 1, 1});
    for (int j = 0; j < nr; ++j)
      for (int i = 0; i < nt; ++i)
        if (t[i]->key != r[j]->key && intersects(t[i]->synsets, r[j]->synsets)) st.add({j, 1, i, 1, 2});
  }

  // Paraphrases of reference phrases found in the test (pass A), then of test phrases found in
  // the reference (pass B).
  void match_paraphrases(Stage& st, const std::vector<const TokenInfo*>& t,
                         const std::vector<const TokenInfo*>& r) const {
    const auto& pt = data_.paraphrase;
    std::vector<int32_t> l1, l2;
    for (auto* x : t) l1.push_back(x->para_id);
    for (auto* x : r) l2.push_back(x->para_id);
    auto find_all = [](const std::vector<int32_t>& line, std::span<const int32_t> words, auto&& f) {
      for (size_t i = 0; i + words.size() <= line.size(); ++i)
        if (std::equal(words.begin(), words.end(), line.begin() + i)) f(static_cast<int>(i));
    };
    auto walk = [&](const std::vector<int32_t>& line, size_t from, auto&& f) {
      for (size_t len = 1; from + len <= line.size() && len <= pt.max_ref_len; ++len) {
        if (line[from + len - 1] < 0) break;
        pt.for_each_exact(std::span<const int32_t>(line.data() + from, len), [&](const auto& e) { f(len, e); });
      }
    };
    for (size_t j = 0; j < l2.size(); ++j)
      walk(l2, j, [&](size_t len, const ParaphraseTable::Entry& e) {
        find_all(l1, pt.par(e), [&](int i) {
          st.add({static_cast<int>(j), static_cast<int>(len), i, static_cast<int>(e.par_len), 3});
        });
      });
    for (size_t i = 0; i < l1.size(); ++i)
      walk(l1, i, [&](size_t len, const ParaphraseTable::Entry& e) {
        find_all(l2, pt.par(e), [&](int j) {
          st.add({j, static_cast<int>(e.par_len), static_cast<int>(i), static_cast<int>(len), 3});
        });
      });
  }

  Path resolve(const Stage& st, Path start) const;
  MeteorStats align_stats(const std::vector<const TokenInfo*>& t, const std::vector<const TokenInfo*>& r) const;
};

// Aligner.resolve: beam search left to right over reference positions.
inline meteor_detail::Path MeteorScorer::resolve(const Stage& st, Path start) const {
  constexpr size_t beam = 40;
  constexpr double w_align[4] = {1.0, 0.5, 0.5, 0.5};
  const int n = static_cast<int>(st.cand.size());
  std::vector<Path> paths, next;
  next.push_back(std::move(start));
  auto take = [&](Path& p, const Match& m) {
    p.match_count++;
    p.matches1 = static_cast<int>(p.matches1 + m.match_length * w_align[m.module]);
    p.matches2 = static_cast<int>(p.matches2 + m.length * w_align[m.module]);
    p.all1 += m.match_length;
    p.all2 += m.length;
    if (p.last_end != -1 && m.match_start != p.last_end) p.chunks++;
    p.idx = m.start + m.length;
    p.last_end = m.match_start + m.match_length;
  };
  for (int current = 0; current <= n; ++current) {
    paths.swap(next);
    next.clear();
    std::stable_sort(paths.begin(), paths.end(), meteor_detail::path_before);
    for (size_t rank = 0; rank < beam && rank < paths.size(); ++rank) {
      Path& path = paths[rank];
      if (current == n) {
        if (path.last_end != -1) path.chunks++;
        next.push_back(std::move(path));
        continue;
      }
      if (path.used2[current]) {
        if (current < path.idx) {
          next.push_back(std::move(path));
        } else if (path.matches[path.idx] != nullptr) {
          const Match& m = *path.matches[path.idx];
          take(path, m);
          path.distance += std::abs(m.start - m.match_start);
          next.push_back(std::move(path));
        }
        continue;
      }
      for (const Match& m : st.cand[current]) {
        if (path.is_used(m)) continue;
        Path np = path;
        np.set_used(m);
        np.matches[current] = &m;
        take(np, m);
        // METEOR adds the distance to the parent path, not to the new one.
        path.distance += std::abs(m.start - m.match_start);
        next.push_back(std::move(np));
      }
      if (path.last_end != -1) {
        path.chunks++;
        path.last_end = -1;
      }
      path.idx++;
      next.push_back(std::move(path));
    }
    if (next.empty()) next.push_back(paths[0]);  // the jar warns and keeps the best previous path
  }
  std::stable_sort(next.begin(), next.end(), meteor_detail::path_before);
  return std::move(next[0]);
}

inline MeteorStats MeteorScorer::align_stats(const std::vector<const TokenInfo*>& t,
                                             const std::vector<const TokenInfo*>& r) const {
  const int nt = static_cast<int>(t.size()), nr = static_cast<int>(r.size());
  Stage st;
  st.cand.resize(nr);
  st.cov1.assign(nt, 0);
  st.cov2.assign(nr, 0);
  bool identical = nt == nr;
  for (int i = 0; identical && i < nt; ++i) identical = t[i]->key == r[i]->key;
  match_words(st, t, r, identical ? 1 : 4);
  if (!identical) match_paraphrases(st, t, r);

  Path start;
  start.matches.assign(nr, nullptr);
  start.used1.assign(nt, 0);
  start.used2.assign(nr, 0);
  for (int j = 0; j < nr; ++j) {
    if (st.cand[j].size() != 1) continue;
    const Match& m = st.cand[j][0];
    bool overlap = false;
    for (int k = 0; k < m.length; ++k) overlap = overlap || st.cov2[j + k] != 1;
    for (int k = 0; k < m.match_length; ++k) overlap = overlap || st.cov1[m.match_start + k] != 1;
    if (!overlap) {
      start.matches[j] = &m;
      start.set_used(m);
    }
  }
  const Path best = resolve(st, std::move(start));

  MeteorStats s;
  s.test_len = nt;
  s.ref_len = nr;
  for (auto* x : t) s.test_func += x->function_word;
  for (auto* x : r) s.ref_func += x->function_word;
  // Per-module matched words by type, and chunks recounted along the reference.
  int chunks = 0, last_end = -1, m1 = 0, m2 = 0;
  for (int idx = 0; idx < nr;) {
    const Match* m = best.matches[idx];
    if (!m) {
      if (last_end != -1) {
        chunks++;
        last_end = -1;
      }
      idx++;
      continue;
    }
    m1 += m->match_length;
    m2 += m->length;
    if (last_end != -1 && m->match_start != last_end) chunks++;
    idx = m->start + m->length;
    last_end = m->match_start + m->match_length;
  }
  if (last_end != -1) chunks++;
  for (int j = 0; j < nr; ++j) {
    const Match* m = best.matches[j];
    if (!m) continue;
    for (int k = 0; k < m->match_length; ++k)
      (t[m->match_start + k]->function_word ? s.test_function : s.test_content)[m->module] += 1;
    for (int k = 0; k < m->length; ++k)
      (r[m->start + k]->function_word ? s.ref_function : s.ref_content)[m->module] += 1;
  }
  s.chunks = chunks;
  for (int i = 0; i < 4; ++i) {
    s.test_word_matches += s.test_content[i] + s.test_function[i];
    s.ref_word_matches += s.ref_content[i] + s.ref_function[i];
  }
  return s;
}

// Per-item METEOR scores and the corpus score from summed statistics.
struct MeteorResult {
  double corpus = 0;
  std::vector<double> per_item;
  std::vector<MeteorStats> stats;
};

inline MeteorResult meteor_corpus(const std::vector<MeteorStats>& stats) {
  MeteorResult res;
  res.stats = stats;
  MeteorStats total;
  for (const auto& s : stats) {
    res.per_item.push_back(meteor_score(s));
    total.add(s);
  }
  res.corpus = meteor_score(total);
  return res;
}

}  // namespace tq::metrics
