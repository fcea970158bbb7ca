// Json parser and printer: escapes, numbers, nesting, errors with byte offsets, round trips.
#include <gtest/gtest.h>

#include <string>

#include "rtllm/json.h"

using rtllm::Json;

namespace {

// Expects Json::parse(text) to fail and its message to name `offset`.
void expect_error_at(const std::string& text, size_t offset) {
  try {
    Json::parse(text);
    FAIL() << "parsed invalid JSON: " << text;
  } catch (const rtllm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("at byte " + std::to_string(offset)), std::string::npos)
        << text << " -> " << e.what();
  }
}

}  // namespace

TEST(Json, Scalars) {
  EXPECT_TRUE(Json::parse("null").is_null());
  EXPECT_TRUE(Json::parse(" true ").as_bool());
  EXPECT_FALSE(Json::parse("false").as_bool());
  EXPECT_EQ(Json::parse("42").as_int(), 42);
  EXPECT_EQ(Json::parse("-7").as_int(), -7);
  EXPECT_DOUBLE_EQ(Json::parse("1e-5").as_double(), 1e-5);
  EXPECT_DOUBLE_EQ(Json::parse("-2.5E+3").as_double(), -2500.0);
  EXPECT_DOUBLE_EQ(Json::parse("500000.0").as_double(), 500000.0);
  EXPECT_EQ(Json::parse("9007199254740993").as_double(), 9007199254740993.0);
  EXPECT_THROW(Json::parse("1.5").as_int(), rtllm::Error);
}

TEST(Json, StringEscapes) {
  EXPECT_EQ(Json::parse(R"("a\"b\\c\/d\n\t\r\b\f")").as_string(), "a\"b\\c/d\n\t\r\b\f");
  EXPECT_EQ(Json::parse(R"("\u0041\u00e9\u20ac")").as_string(), "A\xC3\xA9\xE2\x82\xAC");
  // U+1F600 as a surrogate pair -> 4-byte UTF-8.
  EXPECT_EQ(Json::parse(R"("\ud83d\ude00")").as_string(), "\xF0\x9F\x98\x80");
  // Raw UTF-8 passes through.
  EXPECT_EQ(Json::parse("\"\xE4\xBD\xA0\"").as_string(), "\xE4\xBD\xA0");
}

TEST(Json, Nesting) {
  Json j = Json::parse(R"({"a": [1, {"b": [true, null, "x"]}], "c": {}, "d": []})");
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j.size(), 3u);
  EXPECT_EQ(j["a"].at(0).as_int(), 1);
  EXPECT_EQ(j["a"].at(1)["b"].at(2).as_string(), "x");
  EXPECT_TRUE(j["a"].at(1)["b"].at(1).is_null());
  EXPECT_EQ(j["c"].size(), 0u);
  EXPECT_EQ(j["d"].size(), 0u);
  EXPECT_TRUE(j.contains("c"));
  EXPECT_FALSE(j.contains("z"));
  EXPECT_EQ(j.get_int("z", 5), 5);
  EXPECT_THROW(j.at("z"), rtllm::Error);
  EXPECT_THROW(j["a"].as_object(), rtllm::Error);
}

TEST(Json, ErrorsNameTheOffset) {
  expect_error_at("", 0);
  expect_error_at("[1, 2", 5);
  expect_error_at("{\"a\" 1}", 5);
  expect_error_at("[1,]", 3);
  expect_error_at("tru", 0);
  expect_error_at("\"abc", 4);
  expect_error_at("\"\\x\"", 2);
  expect_error_at("\"\\ud83d\"", 7);  // unpaired high surrogate
  expect_error_at("\"\\ude00\"", 7);  // lone low surrogate
  expect_error_at("01", 1);
  expect_error_at("1 2", 2);
  expect_error_at("-", 1);
  expect_error_at("1.", 2);
  expect_error_at("\"a\nb\"", 2);
}

TEST(Json, DumpRoundTrips) {
  const std::string text =
      R"({"format_version": 1, "name": "q\"uo\\te\n\u0001", "eps": 1e-05, "theta": 500000.0,)"
      R"( "ids": [2, -3, 128009], "nested": {"x": [], "y": {}, "z": null, "w": false}, "f": 0.1})";
  Json j = Json::parse(text);
  for (int indent : {-1, 0, 2}) {
    Json again = Json::parse(j.dump(indent));
    EXPECT_EQ(again.dump(), j.dump());
  }
  EXPECT_DOUBLE_EQ(Json::parse(j.dump())["eps"].as_double(), 1e-5);
  EXPECT_DOUBLE_EQ(Json::parse(j.dump())["f"].as_double(), 0.1);
  EXPECT_EQ(Json::parse(j.dump())["name"].as_string(), "q\"uo\\te\n\x01");
  // Member order is kept.
  EXPECT_EQ(j.dump().rfind("{\"format_version\":1,\"name\":", 0), 0u);
}

TEST(Json, Builders) {
  Json obj;
  obj.set("b", Json(int64_t{2}));
  obj.set("a", Json("x"));
  obj.set("b", Json(3.5));
  Json arr;
  arr.push_back(Json(true));
  arr.push_back(obj);
  EXPECT_EQ(arr.dump(), R"([true,{"b":3.5,"a":"x"}])");
  Json copy = obj;
  copy.set("c", Json());
  EXPECT_FALSE(obj.contains("c"));  // copies do not share mutations
  EXPECT_EQ(arr.dump(2), "[\n  true,\n  {\n    \"b\": 3.5,\n    \"a\": \"x\"\n  }\n]");
}

TEST(Json, DeepNestingIsAnError) {
  std::string deep(100000, '[');
  EXPECT_THROW(Json::parse(deep), rtllm::Error);
}
