-- MedSegAgent auto-routing for Orthanc's Lua engine (Lua 5.3, Orthanc 1.10).
--
-- The same rules and the same semantics as the STABLE_STUDY callback of
-- medsegagent_plugin.py; which of the two acts is chosen by
-- MedSegAgent.AutoRouting ("python", the default, or "lua") in Orthanc's
-- configuration, so both can stay loaded without routing a study twice.
--
-- A rule (MedSegAgent.Rules[i]) matches a stable study when StudyDescription
-- matches and at least one image series (CT, MR, PT, US; never the node's own
-- output) matches Modality, BodyPart (BodyPartExamined) and Station
-- (StationName). Patterns: case-insensitive, * and ? wildcards, | between
-- alternatives; an absent criterion matches anything. The first matching rule
-- sends its series to SendTo (default MedSegAgent.NodeModality), after writing
-- a request SR into the study when the rule has a Request.
--
-- Loop guard: SEG series and non-image series made by the node (Manufacturer
-- MedSegAgent) are never sent; the study metadata MedSegAgentRouted records
-- the instance count of every series sent, and a study whose matching series
-- were all sent already (the node's SEG arriving makes it stable again) is
-- skipped.

local SECTION = GetOrthancConfiguration()["MedSegAgent"] or {}
local ENGINE = string.lower(SECTION["AutoRouting"] or "python")
local NODE_MODALITY = SECTION["NodeModality"] or "medseg"
local RULES = SECTION["Rules"] or {}
local IMAGE_MODALITIES = { CT = true, MR = true, PT = true, US = true }
local NODE_MANUFACTURER = "MEDSEGAGENT"
local ROUTED = "MedSegAgentRouted"

local function trim(s)
  return (string.gsub(s or "", "^%s*(.-)%s*$", "%1"))
end

-- Case-insensitive wildcard match; nil pattern matches anything.
local function globMatch(pattern, value)
  if pattern == nil then
    return true
  end
  local text = string.upper(trim(value))
  for alternative in string.gmatch(pattern, "[^|]+") do
    -- Escape Lua's magic characters except * and ?, which become .* and .
    local p = string.gsub(string.upper(trim(alternative)), "[%^%$%(%)%%%.%[%]%+%-]", "%%%0")
    p = string.gsub(string.gsub(p, "%*", ".*"), "%?", ".")
    if string.find(text, "^" .. p .. "$") then
      return true
    end
  end
  return false
end

local function isNodeOutput(tags)
  local modality = string.upper(trim(tags["Modality"]))
  if modality == "SEG" then
    return true
  end
  return string.upper(trim(tags["Manufacturer"])) == NODE_MANUFACTURER and not IMAGE_MODALITIES[modality]
end

local function ruleSeries(rule, studyTags, series)
  local hits = {}
  if not globMatch(rule["StudyDescription"], studyTags["StudyDescription"]) then
    return hits
  end
  for _, s in ipairs(series) do
    local tags = s["MainDicomTags"]
    if not isNodeOutput(tags)
      and IMAGE_MODALITIES[string.upper(trim(tags["Modality"]))]
      and globMatch(rule["Modality"], tags["Modality"])
      and globMatch(rule["BodyPart"], tags["BodyPartExamined"])
      and globMatch(rule["Station"], tags["StationName"]) then
      table.insert(hits, s)
    end
  end
  return hits
end

local function routedSeries(studyId)
  -- ?expand answers {} for a study never routed (a missing key would log an error).
  local metadata = ParseJson(RestApiGet("/studies/" .. studyId .. "/metadata?expand"))
  local value = metadata[ROUTED]
  if value == nil then
    return {}
  end
  local ok, parsed = pcall(ParseJson, value)
  if ok and type(parsed) == "table" and type(parsed["series"]) == "table" then
    return parsed["series"]
  end
  return {}
end

local function alreadySent(recorded, hits)
  for _, s in ipairs(hits) do
    -- tonumber: a count may have been written as a string by another writer.
    if tonumber(recorded[s["ID"]]) ~= #s["Instances"] then
      return false
    end
  end
  return #hits > 0
end

-- The request SR: the same object as request_sr_body() of the Python plugin.
local function createRequestSr(studyId, text)
  -- Its own series: one above the study's highest Series Number (as next_series_number() of the plugin).
  local highest = 0
  for _, s in ipairs(ParseJson(RestApiGet("/studies/" .. studyId .. "/series"))) do
    local number = tonumber(s["MainDicomTags"]["SeriesNumber"] or "")
    if number and number < 2 ^ 30 and number > highest then
      highest = math.floor(number)
    end
  end
  local function code(value, meaning)
    return { { CodeValue = value, CodingSchemeDesignator = "DCM", CodeMeaning = meaning } }
  end
  local body = {
    Parent = studyId,
    Tags = {
      SpecificCharacterSet = "ISO_IR 192",
      SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11",
      Modality = "SR",
      Manufacturer = "MedSegAgent Orthanc plugin",
      SeriesDescription = "MedSegAgent request",
      SeriesNumber = tostring(highest + 1),
      InstanceNumber = "1",
      ReferencedPerformedProcedureStepSequence = {},
      PerformedProcedureCodeSequence = {},
      ValueType = "CONTAINER",
      ConceptNameCodeSequence = code("121144", "Document Title"),
      ContinuityOfContent = "SEPARATE",
      CompletionFlag = "COMPLETE",
      VerificationFlag = "UNVERIFIED",
      ContentSequence = {
        {
          RelationshipType = "CONTAINS",
          ValueType = "TEXT",
          ConceptNameCodeSequence = code("121106", "Comment"),
          TextValue = text,
        },
      },
    },
  }
  -- keepStrings = true: "9901" stays a string, as create-dicom expects.
  return ParseJson(RestApiPost("/tools/create-dicom", DumpJson(body, true)))["ID"]
end

local function route(studyId, studyTags)
  local series = ParseJson(RestApiGet("/studies/" .. studyId .. "/series"))
  for _, rule in ipairs(RULES) do
    local hits = ruleSeries(rule, studyTags, series)
    if #hits > 0 then
      local name = rule["Name"] or "rule"
      local recorded = routedSeries(studyId)
      if alreadySent(recorded, hits) then
        return "already routed (rule " .. name .. "); skipped"
      end
      local resources, instances = {}, 0
      for _, s in ipairs(hits) do
        table.insert(resources, s["ID"])
        instances = instances + #s["Instances"]
      end
      local extra = ""
      if rule["Request"] ~= nil then
        table.insert(resources, createRequestSr(studyId, rule["Request"]))
        extra = " + request SR"
      end
      local target = rule["SendTo"] or NODE_MODALITY
      -- Synchronous: the series are recorded as sent only once the node has them.
      local answer = RestApiPost("/modalities/" .. target .. "/store",
        DumpJson({ Resources = resources, Synchronous = true }, true))
      if answer == nil then
        error("C-STORE to " .. target .. " failed")
      end
      for _, s in ipairs(hits) do
        recorded[s["ID"]] = #s["Instances"]
      end
      -- keepStrings = false: the counts stay JSON numbers.
      RestApiPut("/studies/" .. studyId .. "/metadata/" .. ROUTED, DumpJson({ series = recorded }, false))
      return "rule " .. name .. ": " .. #hits .. " series (" .. instances .. " instances)" .. extra
        .. " sent to " .. target
    end
  end
  return "no rule matches"
end

function OnStableStudy(studyId, tags, metadata)
  if ENGINE ~= "lua" then
    return
  end
  local ok, result = pcall(route, studyId, tags)
  if ok then
    print("MedSegAgent: stable study " .. studyId .. ": " .. result)
  else
    print("MedSegAgent: routing of study " .. studyId .. " failed: " .. tostring(result))
  end
end
