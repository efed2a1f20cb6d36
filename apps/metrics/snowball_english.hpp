// The Snowball English ("Porter2") stemmer as METEOR 1.5 compiles it in
// (org/tartarus/snowball/ext/englishStemmer.java, the 2006 algorithm: R1 exceptions gener/commun/
// arsen only, skis/skies exceptions). Written from the algorithm's definition; newer Snowball
// releases (libstemmer 2.x) changed the rules, which is why we do not link libstemmer.
// Works on code points; only ASCII letters take part in the rules, as in the Java groupings.
#pragma once

#include <string>
#include <string_view>

namespace tq::metrics {

class EnglishStemmer {
 public:
  std::u32string stem(std::u32string_view word) const {
    w_.assign(word.begin(), word.end());
    if (exception1()) return w_;
    if (w_.size() < 3) return w_;
    prelude();
    mark_regions();
    step_1a();
    if (!exception2()) {
      step_1b();
      step_1c();
      step_2();
      step_3();
      step_4();
      step_5();
    }
    for (auto& c : w_)
      if (c == U'Y') c = U'y';
    return w_;
  }

 private:
  mutable std::u32string w_;
  mutable size_t p1_ = 0, p2_ = 0;

  static bool is_v(char32_t c) { return c == 'a' || c == 'e' || c == 'i' || c == 'o' || c == 'u' || c == 'y'; }
  static bool is_v_wxy(char32_t c) { return is_v(c) || c == 'w' || c == 'x' || c == 'Y'; }
  static bool is_valid_li(char32_t c) { return std::u32string_view(U"cdeghkmnrt").find(c) != std::u32string_view::npos; }

  bool ends(std::u32string_view s) const {
    return w_.size() >= s.size() && std::u32string_view(w_).substr(w_.size() - s.size()) == s;
  }
  // Replaces the last `n` chars with `to`.
  void replace_end(size_t n, std::u32string_view to) const {
    w_.resize(w_.size() - n);
    w_.append(to);
  }

  bool exception1() const {
    struct E {
      std::u32string_view word, to;
    };
    static constexpr E table[] = {{U"skis", U"ski"},     {U"skies", U"sky"},   {U"dying", U"die"},  {U"lying", U"lie"},
                                  {U"tying", U"tie"},    {U"idly", U"idl"},    {U"gently", U"gentl"}, {U"ugly", U"ugli"},
                                  {U"early", U"earli"},  {U"only", U"onli"},   {U"singly", U"singl"}, {U"sky", U"sky"},
                                  {U"news", U"news"},    {U"howe", U"howe"},   {U"atlas", U"atlas"}, {U"cosmos", U"cosmos"},
                                  {U"bias", U"bias"},    {U"andes", U"andes"}};
    for (const auto& e : table) {
      if (w_ == e.word) {
        w_.assign(e.to);
        return true;
      }
    }
    return false;
  }

  bool exception2() const {
    static constexpr std::u32string_view table[] = {U"succeed", U"proceed", U"exceed",  U"canning",
                                                    U"inning",  U"earring", U"herring", U"outing"};
    for (auto e : table)
      if (w_ == e) return true;
    return false;
  }

  void prelude() const {
    if (!w_.empty() && w_[0] == U'\'') w_.erase(0, 1);
    if (!w_.empty() && w_[0] == U'y') w_[0] = U'Y';
    for (size_t i = 1; i < w_.size(); ++i)
      if (w_[i] == U'y' && is_v(w_[i - 1])) w_[i] = U'Y';
  }

  // Position after the first non-vowel that follows a vowel, searching from `from`.
  size_t region_after(size_t from) const {
    size_t i = from;
    while (i < w_.size() && !is_v(w_[i])) ++i;
    if (i >= w_.size()) return w_.size();
    ++i;
    while (i < w_.size() && is_v(w_[i])) ++i;
    if (i >= w_.size()) return w_.size();
    return i + 1;
  }

  void mark_regions() const {
    const std::u32string_view v(w_);
    if (v.starts_with(U"gener") || v.starts_with(U"arsen")) {
      p1_ = 5;
    } else if (v.starts_with(U"commun")) {
      p1_ = 6;
    } else {
      p1_ = region_after(0);
    }
    p2_ = p1_ >= w_.size() ? w_.size() : region_after(p1_);
  }

  // Porter2 "short syllable" ending at position `end` (exclusive).
  bool short_v(size_t end) const {
    if (end >= 3 && !is_v_wxy(w_[end - 1]) && is_v(w_[end - 2]) && !is_v(w_[end - 3])) return true;
    return end == 2 && !is_v(w_[1]) && is_v(w_[0]);
  }
  bool has_vowel(size_t end) const {
    for (size_t i = 0; i < end; ++i)
      if (is_v(w_[i])) return true;
    return false;
  }

  void step_1a() const {
    if (ends(U"'s'")) {
      replace_end(3, U"");
    } else if (ends(U"'s")) {
      replace_end(2, U"");
    } else if (ends(U"'")) {
      replace_end(1, U"");
    }
    if (ends(U"sses")) {
      replace_end(2, U"");
    } else if (ends(U"ied") || ends(U"ies")) {
      replace_end(3, w_.size() > 4 ? U"i" : U"ie");
    } else if (ends(U"us") || ends(U"ss")) {
      // unchanged
    } else if (ends(U"s")) {
      if (w_.size() >= 2 && has_vowel(w_.size() - 2)) replace_end(1, U"");
    }
  }

  void step_1b() const {
    if (ends(U"eedly") || ends(U"eed")) {
      const size_t n = ends(U"eedly") ? 5 : 3;
      if (w_.size() - n >= p1_) replace_end(n, U"ee");
      return;
    }
    size_t n = 0;
    if (ends(U"ingly")) n = 5;
    else if (ends(U"edly")) n = 4;
    else if (ends(U"ing")) n = 3;
    else if (ends(U"ed")) n = 2;
    if (n == 0 || !has_vowel(w_.size() - n)) return;
    replace_end(n, U"");
    if (ends(U"at") || ends(U"bl") || ends(U"iz")) {
      w_.push_back(U'e');
    } else if (ends(U"bb") || ends(U"dd") || ends(U"ff") || ends(U"gg") || ends(U"mm") || ends(U"nn") ||
               ends(U"pp") || ends(U"rr") || ends(U"tt")) {
      w_.pop_back();
    } else if (w_.size() == p1_ && short_v(w_.size())) {
      w_.push_back(U'e');
    }
  }

  void step_1c() const {
    if (w_.size() < 3) return;
    const char32_t last = w_.back();
    if ((last == U'y' || last == U'Y') && !is_v(w_[w_.size() - 2])) w_.back() = U'i';
  }

  struct Rule {
    std::u32string_view suffix;
    std::u32string_view to;
    int action;  // 0 replace, 1 'ogi' needs l, 2 'li' needs valid li, 3 delete if in R2
  };

  // Longest matching suffix among `rules`, then the region test; no fallback to shorter ones.
  template <size_t N>
  void apply_longest(const Rule (&rules)[N], size_t region) const {
    const Rule* best = nullptr;
    for (const auto& r : rules)
      if (ends(r.suffix) && (!best || r.suffix.size() > best->suffix.size())) best = &r;
    if (!best) return;
    const size_t start = w_.size() - best->suffix.size();
    if (start < region) return;
    if (best->action == 1 && !(start >= 1 && w_[start - 1] == U'l')) return;
    if (best->action == 2 && !(start >= 1 && is_valid_li(w_[start - 1]))) return;
    if (best->action == 3 && start < p2_) return;
    replace_end(best->suffix.size(), best->to);
  }

  void step_2() const {
    static constexpr Rule rules[] = {
        {U"tional", U"tion", 0}, {U"enci", U"ence", 0},   {U"anci", U"ance", 0},     {U"abli", U"able", 0},
        {U"entli", U"ent", 0},   {U"izer", U"ize", 0},    {U"ization", U"ize", 0},   {U"ational", U"ate", 0},
        {U"ation", U"ate", 0},   {U"ator", U"ate", 0},    {U"alism", U"al", 0},      {U"aliti", U"al", 0},
        {U"alli", U"al", 0},     {U"fulness", U"ful", 0}, {U"ousli", U"ous", 0},     {U"ousness", U"ous", 0},
        {U"iveness", U"ive", 0}, {U"iviti", U"ive", 0},   {U"biliti", U"ble", 0},    {U"bli", U"ble", 0},
        {U"ogi", U"og", 1},      {U"fulli", U"ful", 0},   {U"lessli", U"less", 0},   {U"li", U"", 2}};
    apply_longest(rules, p1_);
  }

  void step_3() const {
    static constexpr Rule rules[] = {{U"tional", U"tion", 0}, {U"ational", U"ate", 0}, {U"alize", U"al", 0},
                                     {U"icate", U"ic", 0},    {U"iciti", U"ic", 0},    {U"ical", U"ic", 0},
                                     {U"ful", U"", 0},        {U"ness", U"", 0},       {U"ative", U"", 3}};
    apply_longest(rules, p1_);
  }

  void step_4() const {
    static constexpr std::u32string_view del[] = {U"al",  U"ance", U"ence", U"er",  U"ic",  U"able",
                                                  U"ible", U"ant", U"ement", U"ment", U"ent", U"ism",
                                                  U"ate", U"iti",  U"ous",  U"ive", U"ize", U"ion"};
    std::u32string_view best;
    for (auto s : del)
      if (ends(s) && s.size() > best.size()) best = s;
    if (best.empty()) return;
    const size_t start = w_.size() - best.size();
    if (start < p2_) return;
    if (best == U"ion" && !(start >= 1 && (w_[start - 1] == U's' || w_[start - 1] == U't'))) return;
    replace_end(best.size(), U"");
  }

  void step_5() const {
    if (ends(U"e")) {
      const size_t start = w_.size() - 1;
      if (start >= p2_ || (start >= p1_ && !short_v(start))) w_.pop_back();
    } else if (ends(U"l")) {
      const size_t start = w_.size() - 1;
      if (start >= p2_ && start >= 1 && w_[start - 1] == U'l') w_.pop_back();
    }
  }
};

}  // namespace tq::metrics
