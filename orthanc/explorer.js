// MedSegAgent: a "Segment…" button on the study page of the legacy Orthanc Explorer.
// Loaded by medsegagent_plugin.py through orthanc.ExtendOrthancExplorer(), which
// prepends MEDSEGAGENT_DEFAULT_REQUEST. Orthanc Explorer uses jQuery 1.x and
// jQuery Mobile, hence .live() and 'pagebeforecreate'.

function MedSegAgentStatus(text, isError) {
  $('#medsegagent-status')
    .text(text)                         // .text(): node messages are never parsed as HTML
    .css('color', isError ? '#b00' : '#333')
    .show();
}

function MedSegAgentError(xhr) {
  try {
    return JSON.parse(xhr.responseText).error;
  } catch (e) {
    return 'HTTP ' + xhr.status;
  }
}

// Poll the node's jobs for this study (through the plugin) until the new job ends.
function MedSegAgentPoll(study, known, started) {
  $.ajax({
    url: '../medsegagent/studies/' + study + '/jobs',
    dataType: 'json',
    cache: false,
    success: function (answer) {
      var job = null;
      for (var i = 0; i < answer.jobs.length; i++) {
        if (known.indexOf(answer.jobs[i].id) < 0) {
          job = answer.jobs[i];
          break;                          // newest first
        }
      }
      var seconds = Math.round((Date.now() - started) / 1000);
      if (job === null) {
        MedSegAgentStatus('Sent to the node; waiting for the study to be complete… (' + seconds + ' s)');
      } else if (job.state === 'delivered') {
        MedSegAgentStatus('Job ' + job.id.substring(0, 8) + ': delivered — the SEG series is in this study.');
        RefreshStudy();                   // Orthanc Explorer's own refresh of the series list
        return;
      } else if (job.state === 'failed' || job.state === 'cancelled') {
        MedSegAgentStatus('Job ' + job.id.substring(0, 8) + ': ' + job.state + ' — ' + (job.error || ''), true);
        return;
      } else {
        MedSegAgentStatus('Job ' + job.id.substring(0, 8) + ': ' + job.state + '… (' + seconds + ' s)');
      }
      if (seconds < 3600) {
        setTimeout(function () { MedSegAgentPoll(study, known, started); }, 2000);
      }
    },
    error: function (xhr) {
      MedSegAgentStatus('Job status unavailable: ' + MedSegAgentError(xhr), true);
    }
  });
}

$('#study').live('pagebeforecreate', function () {
  var item = $('<li data-icon="search"><a href="#" id="medsegagent-segment">Segment…</a></li>');
  item.insertAfter($('#study-store').parent());
  $('<p id="medsegagent-status" style="display:none; padding: 0 1em; white-space: normal"></p>')
    .insertAfter(item.parent());
});

$('#study').live('pagebeforeshow', function () {
  $('#medsegagent-status').hide().text('');
});

$('#medsegagent-segment').live('click', function () {
  var study = $.mobile.pageData.uuid;
  var text = window.prompt('What should MedSegAgent segment in this study?', MEDSEGAGENT_DEFAULT_REQUEST);
  if (text === null || $.trim(text) === '') {
    return false;
  }
  MedSegAgentStatus('Writing the request SR and sending the study to the node…');
  $.ajax({
    url: '../medsegagent/segment',
    type: 'POST',
    contentType: 'application/json',
    dataType: 'json',
    data: JSON.stringify({ study: study, request: text }),
    success: function (answer) {
      RefreshStudy();                     // shows the request SR series
      MedSegAgentPoll(study, answer.known_jobs, Date.now());
    },
    error: function (xhr) {
      MedSegAgentStatus('Segment failed: ' + MedSegAgentError(xhr), true);
    }
  });
  return false;
});
