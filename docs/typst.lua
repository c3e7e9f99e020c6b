-- Pandoc filter for the guide's Typst output.
-- @fig:x, @tbl:x, @sec:x are cross-references, not citations: emit Typst's own @label.
-- Relative image paths get the `image-root` metadata prefix (Typst resolves "/..." against
-- the compile root).

local image_root = ""

local function read_meta(meta)
  if meta["image-root"] then
    image_root = pandoc.utils.stringify(meta["image-root"])
  end
end

local function cite(el)
  local out = {}
  for i, c in ipairs(el.citations) do
    if i > 1 then table.insert(out, pandoc.Str(", ")) end
    table.insert(out, pandoc.RawInline("typst", "@" .. c.id))
  end
  return out
end

local function image(img)
  if image_root ~= "" and not img.src:match("^/") and not img.src:match("^%a+://") then
    img.src = image_root .. img.src
  end
  return img
end

return { { Meta = read_meta }, { Cite = cite, Image = image } }
