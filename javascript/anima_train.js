// sd-webui-anima: the progress of the Train form and of Compare (the host's progress bar), and "send to Anima"
// tab switching.

// `prefix`: the element ids' prefix (PREFIX_progress, PREFIX_gallery_container, PREFIX_preview); args[0] is the
// task id the host's progress route knows the job by.
function animaStartJob(prefix, args) {
    var id = randomId();
    var status = gradioApp().getElementById(prefix + "_progress");
    requestProgress(id, gradioApp().getElementById(prefix + "_gallery_container"),
        gradioApp().getElementById(prefix + "_preview"), function() {}, function(progress) {
            if (status && progress.textinfo) status.innerHTML = "<p>" + progress.textinfo + "</p>";
        });
    var res = Array.from(args);
    res[0] = id;
    return res;
}

function animaShowTab() {
    var buttons = gradioApp().querySelectorAll("#tabs > .tab-nav > button");
    for (var i = 0; i < buttons.length; i++) {
        if (buttons[i].textContent.trim() == "Anima") {
            buttons[i].click();
            break;
        }
    }
    var train = gradioApp().querySelector("#anima_tabs > .tab-nav > button");
    if (train) train.click();
    return [];
}
